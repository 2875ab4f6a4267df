"""The one exception type a user should ever see: a one-line message, non-zero exit."""


class HeimdallError(Exception):
    """A problem with the user's input or environment, reported as one line (no traceback)."""
