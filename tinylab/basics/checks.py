"""Argument checks shared by every public function: one wording for every bad value.

Each check returns the value it accepted, so a caller can write `n = check_int("n", n, low=1)`.
A bool is never an integer or a number here (`True` as a step count is a bug, not a 1).
"""

from __future__ import annotations

import math
import numbers

__all__ = ["check_choice", "check_int", "check_number", "is_int", "is_number"]


def is_int(x) -> bool:
    """An integer that is not a bool (numpy integers count)."""
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def is_number(x) -> bool:
    """A finite real number that is not a bool."""
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(float(x))


def _range(low, high, low_open: bool = False, high_open: bool = False) -> str:
    parts = []
    if low is not None:
        parts.append(f"{'>' if low_open else '>='} {low}")
    if high is not None:
        parts.append(f"{'<' if high_open else '<='} {high}")
    return " and ".join(parts)


def check_int(name: str, value, *, low: int | None = None, high: int | None = None) -> int:
    """`value` as an int, or a ValueError naming `name`, the bad value and the allowed range.

    >>> check_int("steps", 3, low=1)
    3
    >>> check_int("steps", 0, low=1)
    Traceback (most recent call last):
    ...
    ValueError: steps=0: must be an integer >= 1
    """
    if not is_int(value) or (low is not None and value < low) or (high is not None and value > high):
        bounds = _range(low, high)
        raise ValueError(f"{name}={value!r}: must be an integer" + (f" {bounds}" if bounds else ""))
    return int(value)


def check_number(name: str, value, *, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False) -> float:
    """`value` as a finite float in the range, or a ValueError naming it and the allowed range.

    >>> check_number("lr", 1e-2, low=0, low_open=True)
    0.01
    >>> check_number("lr", float("nan"), low=0, low_open=True)
    Traceback (most recent call last):
    ...
    ValueError: lr=nan: must be a finite number > 0
    """
    ok = is_number(value)
    if ok:
        x = float(value)
        ok = not ((low is not None and (x <= low if low_open else x < low))
                  or (high is not None and (x >= high if high_open else x > high)))
    if not ok:
        bounds = _range(low, high, low_open, high_open)
        raise ValueError(f"{name}={value!r}: must be a finite number" + (f" {bounds}" if bounds else ""))
    return float(value)


def check_choice(name: str, value, allowed) -> object:
    """`value` if it is one of `allowed`, else a ValueError listing them.

    >>> check_choice("dtype", "fp16", ("fp32", "bf16"))
    Traceback (most recent call last):
    ...
    ValueError: dtype='fp16': allowed values are 'fp32', 'bf16'
    """
    if value not in allowed:
        raise ValueError(f"{name}={value!r}: allowed values are {', '.join(map(repr, allowed))}")
    return value
