"""The one exception type of the export stage: a problem the user can fix, reported as one line, exit 1."""


class ExportError(RuntimeError):
    """Message says what is wrong, with which value, and how to fix it."""
