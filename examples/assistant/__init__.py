"""An example bot for sectionchat: answers @assistant with a summary of the session (see README.md)."""
