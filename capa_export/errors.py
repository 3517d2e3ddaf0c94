"""One exception type for problems with what the user gave us.

The CLI prints its message as one line and exits with status 2; library callers can catch it.
The message names the input and what would be right.
"""


class CapaError(Exception):
    """A bad input (path, file, config value, model): the message says which and what is expected."""
