"""Errors a user can cause (bad files, bad arguments): reported as one line, never as a traceback."""


class WildzooError(Exception):
    """A problem with the user's input or environment, reported as a clear one-line message."""


class BadWeights(WildzooError):
    """A weight file that is malformed, truncated, unsafe or unsupported."""
