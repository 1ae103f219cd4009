"""The one exception family precondtune raises for problems a user can fix."""
from __future__ import annotations


class PrecondtuneError(Exception):
    """A problem the user can fix; the message says what and how. ``exit_code`` is what the CLI returns."""

    exit_code: int = 2


class ModelFileError(PrecondtuneError):
    """The model file cannot be imported, built or stepped."""


class ConfigError(PrecondtuneError):
    """A bad option, hyperparameter or config-file value."""


class UnknownNameError(ConfigError):
    """An unknown optimizer, GPU profile, dtype, ... name; the message lists the valid ones."""

    def __init__(self, kind: str, name: str, valid: list[str]) -> None:
        super().__init__(f"unknown {kind} {name!r}; valid: {', '.join(valid)}")
        self.kind, self.name, self.valid = kind, name, valid
