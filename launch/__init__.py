"""Floor 3: the `ldm` CLI and every entry point."""
