"""The errors a user can fix: each message says what was wrong and how to fix it.

Entry points print an :class:`InputError` as ``error: <message>`` and exit with status 2,
without a traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

__all__ = ["InputError", "ConfigError", "DataError", "ModelLoadError"]


class InputError(ValueError):
    """Input that cannot be used as it is (a config, a data folder, a model directory)."""


class ConfigError(InputError):
    """A config that cannot run: says which key and how to fix it."""


class DataError(InputError):
    """Input data that cannot be used as it is: says which files and how to fix it."""


class ModelLoadError(InputError):
    """A model directory that cannot be loaded: says what is missing or of the wrong kind."""
