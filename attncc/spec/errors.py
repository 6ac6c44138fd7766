from attncc.core.text import printable


class SpecError(ValueError):
    """A spec that breaks a rule: names the file, the key and (for expressions) the column. The
    file and key are shown :func:`~attncc.core.text.printable` (a key or file name holding a newline
    or a terminal escape is one line of text in the message); ``file`` and ``key`` keep them as given."""

    def __init__(self, file: str, key: str, message: str, column: int | None = None):
        self.file, self.key, self.reason, self.column = file, key, message, column
        where = f"{printable(file)}: {printable(key)}" if key else printable(file)
        if column is not None:
            where += f", column {column}"
        super().__init__(f"{where}: {message}")
