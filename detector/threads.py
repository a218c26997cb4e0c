"""Process-wide compute threads for torch and faiss, set in one place."""

from __future__ import annotations

import faiss
import torch


def set_threads(num_threads: int | None) -> None:
    """Pin torch and faiss threads: on a shared box oversubscription costs more than it gives.

    None keeps the libraries' defaults.
    """
    if num_threads:
        torch.set_num_threads(int(num_threads))
        faiss.omp_set_num_threads(int(num_threads))
