"""Argument checks shared by the public classes: one wording for every count and size.

A count that reaches the C++ core through nanobind must be a real integer of the right
range *before* the call: otherwise nanobind answers ``TypeError: incompatible function
arguments`` (a huge int), or silently takes ``True`` as 1 and ``16.0`` as 16.
"""

from __future__ import annotations

import math
import numbers
import operator
from typing import Any

import numpy as np

__all__ = ["as_count", "as_flag", "as_fraction"]

INT32_MAX = (1 << 31) - 1
INT64_MAX = (1 << 63) - 1


def as_count(value: Any, name: str, *, minimum: int = 1, maximum: int | None = None) -> int:
    """``value`` as a Python int in ``[minimum, maximum]``.

    Accepts ``int`` and NumPy integers (anything with ``__index__``) but not ``bool``,
    floats or strings.

    Raises:
        TypeError: not an integer, or a bool.
        ValueError: outside ``[minimum, maximum]`` (``maximum`` None: no upper bound); the
            message states the allowed range.
    """
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an integer, got bool ({value!r})")
    try:
        n = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}") from None
    if n < minimum or (maximum is not None and n > maximum):
        limit = "positive" if minimum == 1 else f">= {minimum:,}"
        if maximum is not None:
            limit += f" and at most {maximum:,}"
        raise ValueError(f"{name} must be {limit}, got {n:,}")
    return n


def as_flag(value: Any, name: str) -> bool:
    """``value`` as a bool: ``bool`` or ``numpy.bool_`` only (``"no"`` and ``0`` are not
    flags: a truthiness test would turn ``"no"`` on).

    Raises:
        TypeError: anything else.
    """
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise TypeError(f"{name} must be a bool, got {type(value).__name__} ({value!r})")


def as_fraction(value: Any, name: str) -> float:
    """``value`` (a real number, not a bool or a string) as a finite float >= 0.

    Raises:
        TypeError: not a real number, or a bool.
        ValueError: negative, NaN or infinite.
    """
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} "
                        f"({value!r})")
    x = float(value)
    if not 0.0 <= x < math.inf:
        raise ValueError(f"{name} must be finite and >= 0, got {x}")
    return x
