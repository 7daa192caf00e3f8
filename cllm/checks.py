"""The checks of whole-number settings that callers hand in (counts, sizes, seeds), one rule worded one way.

The rule: an integer (Python's or numpy's) within the bounds, and never a bool. True is an int to Python, so a
check written as `isinstance(value, int)` takes `n=True` as 1; and copies of one check written by hand drift
apart. Whatever is refused raises UsageError naming the setting.
"""
from __future__ import annotations

from numbers import Integral

from .errors import UsageError


def require_int(name: str, value, *, minimum: int = 1, maximum: int | None = None,
                optional: bool = False) -> int | None:
    """value as an int if it is an integer from minimum to maximum (no upper bound if None); with optional, None
    is taken too and returned as it is. Else UsageError: "{name} must be a positive integer, got ...".
    """
    if optional and value is None:
        return None
    if isinstance(value, Integral) and not isinstance(value, bool) and minimum <= value \
            and (maximum is None or value <= maximum):
        return int(value)
    raise UsageError(f"{name} must be {_integers(minimum, maximum)}{' or None' if optional else ''}, got {value!r}")


def _integers(minimum: int, maximum: int | None) -> str:
    if maximum is not None:
        return f"an integer from {minimum} to {maximum}"
    return {0: "a non-negative integer", 1: "a positive integer"}.get(minimum, f"an integer of at least {minimum}")
