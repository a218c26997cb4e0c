"""Waiting for a `bentoml serve` this process started: the demo's, and (devtools/) the
tests' and benchmarks'. Light on purpose: httpx only."""

from __future__ import annotations

import subprocess
import time

import httpx


def wait_until_ready(url: str, process: subprocess.Popen, timeout: float) -> None:
    """Return once /readyz answers 200; RuntimeError if the server exits first or is not
    ready in time. (devtools/ serves tests and benchmarks with this one too.)"""
    deadline = time.monotonic() + timeout
    # One client for every poll: `httpx.get` builds one, and a TLS context (~50 ms of
    # CPU), per call, which at this rate took a quarter of a core from the starting server.
    with httpx.Client(timeout=2) as client:
        while process.poll() is None:
            try:
                if client.get(f"{url}/readyz").status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"bentoml serve was not ready within {timeout:.0f} s")
            time.sleep(0.1)
    raise RuntimeError(f"bentoml serve exited with {process.returncode}")
