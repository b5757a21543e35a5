"""The one exception type the CLI turns into a single line and exit code 2."""


class EdgekdError(Exception):
    """A user-facing problem: the message names what is wrong and how to fix it."""
