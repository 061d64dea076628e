"""Errors for user mistakes: one line naming the file, key or option.

Recipes catch `LoraSdError`, print its message and exit 2 (no traceback).
"""


class LoraSdError(Exception):
    """Base class: a problem with the user's input, not a bug."""


class ConfigError(LoraSdError):
    """A config key or command-line option is unknown or has a bad value."""


class FormatError(LoraSdError):
    """A file is not readable, or not in a format we know."""


class ModelMismatchError(LoraSdError):
    """A LoRA does not fit the model it is applied to (modules or shapes)."""


class DataError(LoraSdError):
    """A dataset, image or caption problem."""
