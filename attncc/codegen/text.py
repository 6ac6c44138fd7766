"""The one way text from outside reaches generated source.

A generated module holds code the compiler wrote, validated identifiers and numbers, and text
it did not write: the spec file's path, expressions as sympy prints them, analysis notes. That
text goes through :func:`escaped` (in comments and docstrings) or :func:`py_str` (as a string
literal); the templates call them as the filters ``escaped`` and ``py_str``. A path such as
``x\"\"\";open("P","w");\"\"\".toml`` or one holding a newline then stays text.
"""
from __future__ import annotations


def escaped(text) -> str:
    """``text`` with every character that could end a comment or a double-quoted (or triple-
    double-quoted) Python string written as a Python escape: backslash, double quote and the
    characters that are not printable (newlines, U+2028, U+0085, controls, format characters,
    lone surrogates). Ordinary paths and expressions come out unchanged; ``"" + escaped(t) + ""``
    read back as Python is ``t``."""
    out = []
    for c in str(text):
        if c == "\\" or c == '"':
            out.append("\\" + c)
        elif c.isprintable():
            out.append(c)
        else:
            out.append(repr(c)[1:-1])  # \n, \x85, \u2028, \udcff: never a quote, always ASCII
    return "".join(out)


def py_str(text) -> str:
    """``text`` as a Python string literal (what ``repr`` gives, in double quotes)."""
    return f'"{escaped(text)}"'
