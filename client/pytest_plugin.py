"""pytest plugin: the `sectionchat_server` fixture (placeholder, being written)."""
