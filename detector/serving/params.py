"""Query parameters and JSON fields read one way, with a 400 and a sentence for anything
out of shape: `int("²")`, a 5,000-digit number or `true` taken as 1.0 must never reach
the code that uses them."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from detector.errors import UserError

MAX_DIGITS = 12


class BadParameter(UserError):
    """A parameter that is not what the route takes (HTTP 400)."""


def whole_number(params: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    value = params.get(name)
    if value is None or value == "":
        return default
    if not (value.isascii() and value.isdigit()) or len(value) > MAX_DIGITS:
        raise BadParameter(f"{name} must be a whole number between {low} and {high}.")
    number = int(value)
    if not low <= number <= high:
        raise BadParameter(f"{name} must be between {low} and {high}; it was {number}.")
    return number


def real_number(
    params: Mapping[str, str], name: str, default: float | None, low: float, high: float
) -> float | None:
    """A decimal number within (low, high]; NaN, infinities and overlong text refused."""
    value = params.get(name)
    if value is None or value == "":
        return default
    try:
        number = float(value) if value.isascii() and len(value) <= 32 else math.nan
    except ValueError:
        number = math.nan
    if not (math.isfinite(number) and low < number <= high):
        raise BadParameter(f"{name} must be a number above {low} and at most {high}.")
    return number


def json_number(
    body: Mapping[str, Any], name: str, default: float | None, low: float, high: float
) -> float | None:
    """A number in a JSON body within (low, high]; text, booleans, NaN and infinities
    refused (JSON numbers, unlike query strings, arrive typed)."""
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadParameter(f"{name} must be a number.")
    if not (math.isfinite(value) and low < value <= high):
        raise BadParameter(f"{name} must be a number above {low} and at most {high}.")
    return float(value)


def only_fields(body: Mapping[str, Any], allowed: set[str], usage: str) -> None:
    unknown = sorted(str(key)[:40] for key in body.keys() - allowed)
    if unknown:
        raise BadParameter(f"Unknown field(s) {', '.join(unknown)}: {usage}")
