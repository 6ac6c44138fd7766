"""attncc's version: generated files' headers and the compile cache's keys name it."""
VERSION = "0.1.0"  # as pyproject.toml's
