"""The sectionchat server: chat logic, storage, transport and lifecycle."""

__version__ = "0.1.0"
