"""The one exception type users see: a clear message and a non-zero exit, never a deep traceback."""


class StepstreamError(Exception):
    """A problem with the user's input or environment, worded for the user.

    The CLI prints the message alone and exits with status 2. Library callers catch it
    like any other exception.
    """
