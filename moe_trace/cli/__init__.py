"""The `moe-trace` command line."""
