class SpecError(ValueError):
    """A spec that breaks a rule: names the file, the key and (for expressions) the column."""

    def __init__(self, file: str, key: str, message: str, column: int | None = None):
        self.file, self.key, self.reason, self.column = file, key, message, column
        where = f"{file}: {key}" if key else file
        if column is not None:
            where += f", column {column}"
        super().__init__(f"{where}: {message}")
