"""Argument checks in Hypothesis's style: raise ``InvalidArgument`` naming the bad value."""
from __future__ import annotations

from typing import Any, Iterable

from hypothesis.errors import InvalidArgument


def check_choice(name: str, values: Iterable[Any], allowed: Iterable[Any]) -> tuple:
    values = tuple(values)
    allowed = tuple(allowed)
    if not values:
        raise InvalidArgument(f"{name} must not be empty; choose from {allowed}")
    for value in values:
        if value not in allowed:
            raise InvalidArgument(f"{name} contains {value!r}, which is not one of {allowed}")
    return values


def check_int(name: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidArgument(f"{name}={value!r} must be an integer in [{low}, {high}]")
    return value
