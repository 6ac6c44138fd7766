"""Where attncc's non-Python files are: the jinja2 templates of the generated modules.

The repository keeps ``templates/`` at its top level (the layout in the README); a built wheel or a
regular ``pip install .`` carries the same files as the package data ``attncc/templates``
(pyproject.toml maps one onto the other). This module imports nothing, so that the compiler's cache
key (``attncc.module_cache``) can hash the templates without loading jinja2.
"""
from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent.parent  # attncc/


def templates_dir() -> Path:
    """The folder of the ``*.j2`` templates: the installed package data ``attncc/templates`` first,
    else the top-level ``templates/`` of the source checkout this package was imported from."""
    for place in (_PACKAGE / "templates", _PACKAGE.parent / "templates"):
        if place.is_dir() and any(place.glob("*.j2")):
            return place
    raise FileNotFoundError(f"attncc: no templates at {_PACKAGE / 'templates'} (an installed package) nor at "
                            f"{_PACKAGE.parent / 'templates'} (a source checkout): a broken install; reinstall "
                            f"attncc (`pip install .` or a wheel built from the repository)")
