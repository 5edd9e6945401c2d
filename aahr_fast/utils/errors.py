"""Error types with messages that name the file / index / field and what was expected."""
from __future__ import annotations

import difflib
from typing import Iterable, Sequence


class AAHRError(Exception):
    """Base class of every error aahr_fast raises on purpose."""


class DataError(AAHRError, ValueError):
    """Bad or inconsistent input data (files, captions, features). The message names the file and index."""


class ConfigError(AAHRError, ValueError):
    """Unknown, mistyped or incompatible configuration values."""


class CheckpointError(AAHRError, ValueError):
    """A checkpoint that cannot be used with the current model/config."""


def suggest_key(name: str, valid: Iterable[str]) -> str:
    """``"; did you mean 'x'?"`` for the closest of ``valid`` to ``name`` (``difflib``, cutoff 0.5), else ``""``."""
    close = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else ""


def unknown_key_error(prefix: str, name: str, valid: Sequence[str]) -> ConfigError:
    """The ConfigError for an unknown config key, with the closest valid key suggested (``difflib``).

    Args:
        prefix: dotted section of the key (``"model"``), or ``""`` for a bare key.
        name: the unknown key. valid: the valid keys of that section, listed in the message.
    Returns:
        ``ConfigError("unknown config key 'model.num_prototype'; did you mean 'model.num_prototypes'? (valid
        keys of model: ...)")`` (not raised: the caller raises it). Shared by the YAML / override loader and
        :meth:`aahr_fast.models.config.ModelConfig.from_dict`. Lives here, below both, so that
        neither config module imports the other for it (``aahr_fast.config`` re-exports it).
    """
    full = f"{prefix}.{name}" if prefix else name
    hint = suggest_key(name, valid)
    if hint:
        close = hint.split("'")[1]
        hint = f"; did you mean {(prefix + '.' + close) if prefix else close!r}?"
    return ConfigError(f"unknown config key {full!r}{hint} (valid keys{' of ' + prefix if prefix else ''}: "
                       f"{', '.join(valid)})")
