"""BentoML's process supervisor, reachable by this service's own user only.

`bentoml serve` runs its workers under circus, whose control socket BentoML binds to a
loopback TCP port with no authentication: any user or sidecar on the machine could ask it
for the workers' environment (every API key) or have it start a program as the service's
user. `private_supervisor` makes BentoML bind both of circus's sockets as Unix sockets in a
folder only this user can enter, before `bentoml serve` creates the supervisor.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any


def private_supervisor() -> Path | None:
    """Have the next supervisor BentoML creates in this process listen on private Unix
    sockets; returns their folder (None where Unix sockets are not available)."""
    if os.name != "posix":
        return None
    import bentoml._internal.utils.circus as circus

    folder = Path(tempfile.mkdtemp(prefix="inspection-supervisor-"))  # mode 0700
    atexit.register(shutil.rmtree, folder, True)
    original = circus.create_standalone_arbiter

    def create_standalone_arbiter(
        watchers: list[Any], *, threaded: bool = False, **kwargs: Any
    ) -> Any:
        arbiter = circus.ThreadedArbiter if threaded else circus.Arbiter
        return arbiter(
            watchers,
            endpoint=f"ipc://{folder}/control",
            pubsub_endpoint=f"ipc://{folder}/events",
            check_delay=kwargs.pop("check_delay", 10),
            **kwargs,
        )

    create_standalone_arbiter.__wrapped__ = original  # type: ignore[attr-defined]
    circus.create_standalone_arbiter = create_standalone_arbiter
    return folder
