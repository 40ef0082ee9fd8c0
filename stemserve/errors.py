"""The one exception type the command line turns into a clear message and a non-zero exit."""


class StemserveError(Exception):
    """A user-facing failure: bad input, missing model, unreachable server.

    The message names the file, URL or setting at fault and, where one exists, the fix.
    """
