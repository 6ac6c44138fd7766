from attncc.core.text import printable


class SpecError(ValueError):
    """A spec that breaks a rule: names the file, the key and (for expressions) the column, and the
    line where the expression as written has several (a TOML multi-line string); both count from 1
    in the text as written. The file and key are shown :func:`~attncc.core.text.printable` (a key or
    file name holding a newline or a terminal escape is one line of text in the message); ``file``
    and ``key`` keep them as given."""

    def __init__(self, file: str, key: str, message: str, column: int | None = None, line: int | None = None):
        self.file, self.key, self.reason, self.column, self.line = file, key, message, column, line
        where = f"{printable(file)}: {printable(key)}" if key else printable(file)
        if line is not None:
            where += f", line {line}"
        if column is not None:
            where += f", column {column}"
        super().__init__(f"{where}: {message}")
