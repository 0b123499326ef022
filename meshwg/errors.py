"""Errors shown to the user as one line, never as a traceback."""


class UserError(Exception):
    """A mistake in a config file, a token or a CLI argument.

    str(err) is the whole message; the CLI prints it as `meshwg: <message>` and exits 1.
    """


class ConfigError(UserError):
    """A mistake at a known place in a config file."""

    def __init__(self, message: str, *, filename: str = "<config>", line: int | None = None, key: str | None = None):
        self.filename = filename
        self.line = line
        self.key = key
        self.message = message
        where = filename if line is None else f"{filename}:{line}"
        super().__init__(f"{where}: {key}: {message}" if key else f"{where}: {message}")
