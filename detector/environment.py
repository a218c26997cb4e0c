"""Settings read from environment variables (INSPECT_*), one reader per kind: a value that
is not what the variable takes is refused with the variable's name and what it takes,
never replaced by a default in silence (INSPECT_MAX_QUEUE=0 is an error, not 16).
Environment variables because that is what `docker run -e`, Cloud Run and Kubernetes set.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping

from detector.errors import UserError


def env_int(
    name: str, default: int | None, minimum: int = 1, environ: Mapping[str, str] = os.environ
) -> int | None:
    """A whole number of at least `minimum`; an unset or empty variable is the default. A
    value that is not one is refused with the variable's name, never replaced silently."""
    value = environ.get(name, "").strip()
    if not value:
        return default
    try:
        number = int(value)
    except ValueError:
        raise UserError(f"{name} must be a whole number; it is {value[:40]!r}.") from None
    if number < minimum:
        raise UserError(f"{name} must be at least {minimum}; it is {number}.")
    return number


def env_float(
    name: str,
    default: float,
    minimum: float = 0.0,
    maximum: float = math.inf,
    environ: Mapping[str, str] = os.environ,
) -> float:
    """A finite number in [minimum, maximum]; unset or empty is the default."""
    value = environ.get(name, "").strip()
    if not value:
        return default
    try:
        number = float(value)
    except ValueError:
        raise UserError(f"{name} must be a number; it is {value[:40]!r}.") from None
    if not (math.isfinite(number) and minimum <= number <= maximum):
        bounds = f"at least {minimum:g}" + (
            f" and at most {maximum:g}" if maximum < math.inf else ""
        )
        raise UserError(f"{name} must be {bounds}; it is {value[:40]!r}.")
    return number


TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def env_bool(name: str, default: bool, environ: Mapping[str, str] = os.environ) -> bool:
    value = environ.get(name, "").strip().lower()
    if not value:
        return default
    if value not in TRUE + FALSE:
        raise UserError(f"{name} must be true or false; it is {value[:40]!r}.")
    return value in TRUE


def env_choice(
    name: str, default: str, choices: tuple[str, ...], environ: Mapping[str, str] = os.environ
) -> str:
    value = environ.get(name, "").strip().lower() or default
    if value not in choices:
        raise UserError(f"{name} must be one of {', '.join(choices)}; it is {value!r}.")
    return value
