"""Command-line entry points of `python -m distill` (one module per command)."""
