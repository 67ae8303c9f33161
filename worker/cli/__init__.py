"""The `dnd-client` command line (CONTRACT §4)."""
