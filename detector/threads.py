"""Process-wide compute threads for torch and faiss, set in one place, and how many CPUs this
process may use (light to import: torch and faiss load only when threads are set)."""

from __future__ import annotations

import os


def usable_cpus() -> int:
    """The CPUs this process may run on: its affinity where the system has one (Linux; a
    container's cpuset), else the machine's count (macOS and Windows have no
    `os.sched_getaffinity`)."""
    affinity = getattr(os, "sched_getaffinity", None)
    if affinity is not None:
        return len(affinity(0))
    return os.cpu_count() or 1


def set_threads(num_threads: int | None) -> None:
    """Pin torch and faiss threads: on a shared box oversubscription costs more than it gives.

    None keeps the libraries' defaults.
    """
    if num_threads:
        import faiss
        import torch

        torch.set_num_threads(int(num_threads))
        faiss.omp_set_num_threads(int(num_threads))
