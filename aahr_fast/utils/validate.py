"""Small shared helpers for clear bad-input errors (see ``tests/test_bad_inputs.py``, the bad-input corpus).

* :func:`error_message` turns an :class:`~aahr_fast.utils.errors.AAHRError` into the one-paragraph text a
  CLI prints. It undoes the wrapping torch's DataLoader applies to an exception raised in a worker process
  (``"Caught DataError in DataLoader worker process 0.\\nOriginal Traceback (most recent call last): ..."``),
  so that ``data.num_workers > 0`` never puts a Python traceback into a user-facing message.
* :func:`check_positive_int` validates a count option (batch size, top-k, ...) and names it.
"""
from __future__ import annotations

from typing import Any

from aahr_fast.utils.errors import ConfigError

__all__ = ["error_message", "check_positive_int", "WORKER_TRACEBACK_MARK"]

#: Text torch's ``ExceptionWrapper.reraise`` puts into the message of an exception re-raised from a worker.
WORKER_TRACEBACK_MARK = "Original Traceback (most recent call last):"


def error_message(err: BaseException) -> str:
    """The user-facing message of ``err``: ``str(err)`` without a DataLoader worker's traceback.

    torch re-raises an exception from a DataLoader worker as ``type(err)(msg)`` where ``msg`` is
    ``"Caught <Type> in DataLoader worker process <k>.\\nOriginal Traceback (most recent call last):\\n
    <frames>\\n<module>.<Type>: <original message>"``. This returns ``<original message>`` (which may
    span several lines, e.g. a YAML parser's report) followed by `` (in DataLoader worker process <k>)``;
    any other exception's ``str`` is returned unchanged.

    Args:
        err: the exception (any type; typically an ``AAHRError`` caught by a CLI).
    Returns:
        the message, stripped of surrounding whitespace.
    """
    msg = str(err)
    if WORKER_TRACEBACK_MARK not in msg:
        return msg.strip()
    head, _, frames = msg.partition(WORKER_TRACEBACK_MARK)
    cls = type(err)
    where = ""
    if head.startswith("Caught ") and " in " in head:
        where = " (in " + head.split(" in ", 1)[1].strip().rstrip(".") + ")"
    for prefix in (f"{cls.__module__}.{cls.__qualname__}: ", f"{cls.__qualname__}: "):
        pos = frames.rfind("\n" + prefix)
        if pos >= 0:
            return frames[pos + 1 + len(prefix):].strip() + where
    lines = [ln for ln in frames.strip().splitlines() if ln.strip()]
    return (lines[-1].strip() if lines else head.strip()) + where


def check_positive_int(name: str, value: Any, *, minimum: int = 1, error: type = ConfigError) -> int:
    """Return ``value`` as an ``int`` when it is an integer ``>= minimum`` (booleans refused).

    Args:
        name: the option's name, used in the message (e.g. ``"k"``, ``"optim.batch_size"``).
        value: the value to check. minimum: smallest allowed value. error: exception class to raise.
    Raises:
        ``error`` (default :class:`~aahr_fast.utils.errors.ConfigError`) naming ``name``, the expected
        range and the value given.
    """
    import numbers

    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < minimum:
        raise error(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)
