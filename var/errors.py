"""Errors the entry point reports as one line (no traceback): the user can fix them from the message."""


class UserError(RuntimeError):
    """Base class: a problem with the user's input (config, files, data), not a bug."""


class ConfigError(UserError):
    """An invalid config value; the message names the key."""


class DataError(UserError):
    """Missing, empty or unreadable data; the message names the path."""


class TrainingDiverged(UserError):
    """A non-finite loss or gradient; the message names the step and the last good checkpoint."""
