"""Errors a user can cause. The CLI prints them as one line and exits non-zero."""


class PollinateError(Exception):
    """Base class for bad input or a refused operation: shown to the user, never a traceback."""


class NotFound(PollinateError):
    """A model, version, channel or artifact that does not exist."""


class InvalidInput(PollinateError):
    """A value that breaks a rule (a channel name, a percent, a file that is not there)."""
