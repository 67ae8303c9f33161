"""The `dnd-client` command line (docs/contract.md §4)."""
