"""The one way text from outside reaches generated source.

A generated module holds code the compiler wrote, validated identifiers and numbers, and text
it did not write: the spec file's path, expressions as sympy prints them, analysis notes. That
text goes through :func:`escaped` (in comments and docstrings) or :func:`py_str` (as a string
literal); the templates call them as the filters ``escaped`` and ``py_str``. A path such as
``x\"\"\";open("P","w");\"\"\".toml`` or one holding a newline then stays text.
"""
from __future__ import annotations

from attncc.core.text import printable


def escaped(text) -> str:
    """``text`` with every character that could end a comment or a double-quoted (or triple-
    double-quoted) Python string written as a Python escape: backslash, double quote and the
    characters that are not printable (:func:`attncc.core.text.printable`: newlines, U+2028,
    U+0085, controls, format characters, lone surrogates). Ordinary paths and expressions come out
    unchanged; ``"" + escaped(t) + ""`` read back as Python is ``t``."""
    return printable(str(text).replace("\\", "\\\\").replace('"', '\\"'))


def py_str(text) -> str:
    """``text`` as a Python string literal (what ``repr`` gives, in double quotes)."""
    return f'"{escaped(text)}"'
