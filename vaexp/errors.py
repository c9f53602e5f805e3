"""The one exception type users see: a message naming the setting and the fix, no traceback."""


class VaexpError(Exception):
    """A problem with the user's input or environment, reported as one clear line.

    The CLI prints ``vaexp: <message>`` to stderr and exits with status 2.
    """

    exit_code = 2
