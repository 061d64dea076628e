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


class TrainingError(LoraSdError):
    """Training had to stop (a NaN loss, non-finite LoRA weights, ...)."""


class ConfigErrors:
    """Collects config problems so that one ConfigError lists them all: "where: `key` problem; ..."."""

    def __init__(self, where: str):
        self.where = where
        self.items: list[str] = []

    def add(self, key: str, msg: str):
        self.items.append(f"`{key}` {msg}")

    def unknown(self, key: str, known, label: str | None = None, what: str = "key"):
        """`key` is not one of `known`: say so, with the closest known name."""
        import difflib

        close = difflib.get_close_matches(key, sorted(known), n=1)
        self.add(label or key, f"is not a known {what}" + (f" (did you mean `{close[0]}`?)" if close else ""))

    def raise_if_any(self):
        if self.items:
            raise ConfigError(f"{self.where}: " + "; ".join(self.items))


class TrainingInterrupted(TrainingError):
    """Ctrl-C during training: the LoRA so far (and the state, for resume) were saved; the message names them.

    A LoraSdError, so that the recipe prints that one line (exit 2, as any stop that kept its saves); a Ctrl-C
    before training starts, or a second one during that save, is a plain KeyboardInterrupt (exit 130)."""
