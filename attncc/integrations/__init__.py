"""Bridges from attncc's generated modules to the libraries models run in (optional extras)."""
