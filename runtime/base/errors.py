"""The one exception type users see: a clear message and a non-zero exit, never a deep traceback."""

import signal


class StepstreamError(Exception):
    """A problem with the user's input or environment, worded for the user.

    The CLI prints the message alone and exits with status 2. Library callers catch it
    like any other exception.
    """


class UnknownOption(StepstreamError, TypeError):
    """A keyword a call does not take, or a required argument missing: also a TypeError, as
    Python (and llama-cpp-python, whose code callers may have) raises it."""


class ContextExceeded(StepstreamError, ValueError):
    """More tokens than the context holds: also a ValueError, as llama-cpp-python raises it."""


class PromptTooLong(ContextExceeded):
    """A prompt refused before it was tokenized: its bytes alone show it holds more tokens than
    the limit (no token is longer than the vocabulary's longest)."""

    def __init__(self, at_least: int, n_bytes: int, limit: int):
        super().__init__(f"the prompt is at least {at_least} tokens ({n_bytes} bytes of text), more than {limit}")
        self.at_least, self.n_bytes, self.limit = at_least, n_bytes, limit


class Terminated(KeyboardInterrupt):
    """SIGTERM (`kill`, a job's time limit), raised by the commands that clean up on it so that it
    unwinds as Ctrl-C does; the command line then exits with 143 (128 + SIGTERM), as a shell
    reports a process the signal ended, where Ctrl-C gives 130."""


class HungUp(Terminated):
    """SIGHUP (the terminal closed, an ssh session dropped): unwinds as SIGTERM does, so a
    conversion cleans up its partial files; the command line exits with 129 (128 + SIGHUP).
    Under `nohup` the signal stays ignored."""


def raise_terminated(signum, frame):
    """A SIGTERM (or SIGHUP) handler: raise Terminated (HungUp) where the main thread is."""
    raise HungUp if signum == getattr(signal, "SIGHUP", None) else Terminated
