"""The one exception type for mistakes a user can make."""


class UsageError(Exception):
    """Bad input or settings: the entry point prints `error: <message>` and exits with code 2."""
