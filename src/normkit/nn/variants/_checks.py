"""Argument checks shared by the variants' constructors."""

from __future__ import annotations

import numbers


def check_count(value: object, name: str, allow_zero: bool = False) -> int:
    """``value`` as an int, or a clear error at construction: a fractional count would be truncated
    without a word, and a zero or negative one fails only at the first forward, far from its cause."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be {'non-negative' if allow_zero else 'positive'}, got {value}")
    return int(value)
