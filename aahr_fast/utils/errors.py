"""Error types with messages that name the file / index / field and what was expected."""
from __future__ import annotations


class AAHRError(Exception):
    """Base class of every error aahr_fast raises on purpose."""


class DataError(AAHRError, ValueError):
    """Bad or inconsistent input data (files, captions, features). The message names the file and index."""


class ConfigError(AAHRError, ValueError):
    """Unknown, mistyped or incompatible configuration values."""


class CheckpointError(AAHRError, ValueError):
    """A checkpoint that cannot be used with the current model/config."""
