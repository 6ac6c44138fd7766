"""Text from outside (spec keys, file names, tune cache fields) as it is shown in messages."""
from __future__ import annotations


def printable(text) -> str:
    """``text`` with each character that is not printable (newlines, U+2028, escape and other
    controls, format characters, lone surrogates) written as its Python escape (``\\n``,
    ``\\x1b``, ``\\udcff``): a file name or spec key in a message is one line of text and moves no
    terminal's cursor. Ordinary text comes out unchanged."""
    text = str(text)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
