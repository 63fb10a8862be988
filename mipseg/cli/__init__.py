"""Typer commands, one module per command; each only parses arguments and calls its stage's API."""
