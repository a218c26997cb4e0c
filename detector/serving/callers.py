"""Who sent a request, as the gate (detector/serving/gate.py) found it, read from BentoML's
request context by the API's methods: the key's name for records, its role for what only
some roles may see, and whether it is a load test's."""

from __future__ import annotations

from typing import Any

from detector.serving.gate import CALLER_SCOPE_KEY, LOAD_TEST_SCOPE_KEY, ROLE_SCOPE_KEY


def caller(ctx: Any) -> str | None:
    """The name of the API key a request came with (set by the gate), for its record."""
    return ctx.request.scope.get(CALLER_SCOPE_KEY) if ctx is not None else None


def role(ctx: Any) -> str | None:
    """The role of the key a request came with (set by the gate); None without a key."""
    return ctx.request.scope.get(ROLE_SCOPE_KEY) if ctx is not None else None


def load_test(ctx: Any) -> bool:
    """Whether a load-test key sent the request (set by the gate): scored, never recorded,
    never in a drift window, counted apart."""
    return bool(ctx.request.scope.get(LOAD_TEST_SCOPE_KEY)) if ctx is not None else False
