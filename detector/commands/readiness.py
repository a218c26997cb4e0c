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
    while process.poll() is None:
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"bentoml serve was not ready within {timeout:.0f} s")
        time.sleep(0.5)
    raise RuntimeError(f"bentoml serve exited with {process.returncode}")
