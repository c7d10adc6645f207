"""The `corral` command-line interface."""
