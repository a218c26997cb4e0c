"""Who made a bank version: the name of the API key that asked for the change on the
service, a fit job's requester, or the user who ran the command on the host. Names only:
never a key."""

from __future__ import annotations

import getpass
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

# Who makes the changes of this context: the name of the API key on the service; unset, a
# change is a command's, made on the host by its user.
_ACTOR: ContextVar[str | None] = ContextVar("bank_change_actor", default=None)


@contextmanager
def acting_as(who: str | None) -> Iterator[None]:
    """Changes made inside name `who` as their author (None: the host's user)."""
    token = _ACTOR.set(who)
    try:
        yield
    finally:
        _ACTOR.reset(token)


def author(change: dict[str, Any]) -> str:
    """Who a version's change is by: a fit job's requester, the acting key, else the
    user who ran the command (never a secret: key names, not keys)."""
    named = change.get("by") or change.get("requested_by") or _ACTOR.get()
    if named:
        return str(named)
    try:
        return f"{getpass.getuser()} (command line)"
    except (KeyError, OSError):  # a container user without a passwd entry
        return "command line"
