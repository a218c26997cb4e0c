"""Greedy k-center coreset (PatchCore) that runs in seconds on a CPU and streams its input.

Plain greedy k-center over 200k patches touches every patch once per selected centre: about
350 s on 2 cores at 10 % (measured, see docs/PERFORMANCE.md). Here the features arrive in
chunks (consecutive images), each chunk keeps its share of centres by greedy k-center on a
seeded random projection, and only the kept rows are held. Each chunk's working set fits in
cache, memory stays at one chunk plus the coreset, and every input row is within its chunk's
covering radius of a kept row, so the union covers the whole training set.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
import torch
from tqdm import tqdm

DEFAULT_CHUNK_ROWS = 16384
DEFAULT_PROJECTION_DIM = 128


def coreset_size(total_rows: int, ratio: float | None = None, size: int | None = None) -> int:
    """How many rows to keep: an absolute `size` wins over `ratio`; never more than the input."""
    if size is not None:
        wanted = int(size)
    elif ratio is not None:
        if not 0 < ratio <= 1:
            raise ValueError(f"coreset ratio must be in (0, 1], got {ratio}")
        wanted = int(np.ceil(total_rows * ratio))
    else:
        wanted = total_rows
    return max(1, min(total_rows, wanted))


def random_projection(dim: int, projection_dim: int, seed: int) -> torch.Tensor | None:
    """Johnson-Lindenstrauss projection; None when projecting would not shrink anything."""
    if projection_dim <= 0 or projection_dim >= dim:
        return None
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(dim, projection_dim, generator=generator) / np.sqrt(projection_dim)


def greedy_k_center(
    features: np.ndarray, n_select: int, *, seed: int = 0, projection: torch.Tensor | None = None
) -> np.ndarray:
    """Indices of `n_select` rows chosen by greedy farthest-point selection (Gonzalez, 1985)."""
    rows = features.shape[0]
    if n_select >= rows:
        return np.arange(rows)
    points = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))
    if projection is not None:
        points = points @ projection
    squared_norms = (points * points).sum(dim=1)
    nearest = torch.full((rows,), float("inf"))
    selected = np.empty(n_select, dtype=np.int64)
    index = int(np.random.default_rng(seed).integers(rows))
    for step in range(n_select):
        selected[step] = index
        distances = squared_norms - 2.0 * torch.mv(points, points[index]) + squared_norms[index]
        torch.minimum(nearest, distances, out=nearest)
        nearest[index] = -1.0  # never pick a centre twice, even with duplicate rows
        index = int(torch.argmax(nearest))
    return selected


def _rechunk(chunks: Iterable[np.ndarray], chunk_rows: int) -> Iterator[np.ndarray]:
    """Regroup feature blocks of any size into `chunk_rows` rows each (the last may be short)."""
    pending: list[np.ndarray] = []
    pending_rows = 0
    for block in chunks:
        block = np.asarray(block, dtype=np.float32).reshape(-1, block.shape[-1])
        while block.shape[0]:
            take = min(chunk_rows - pending_rows, block.shape[0])
            pending.append(block[:take])
            pending_rows += take
            block = block[take:]
            if pending_rows == chunk_rows:
                yield np.concatenate(pending) if len(pending) > 1 else pending[0]
                pending, pending_rows = [], 0
    if pending_rows:
        yield np.concatenate(pending) if len(pending) > 1 else pending[0]


def streaming_coreset(
    chunks: Iterable[np.ndarray],
    total_rows: int,
    n_select: int,
    *,
    seed: int = 0,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    projection_dim: int = DEFAULT_PROJECTION_DIM,
    progress: bool = True,
) -> np.ndarray:
    """Keep `n_select` of `total_rows` streamed feature rows; returns the kept rows.

    Each chunk keeps a share proportional to its size (largest remainders get the leftover
    rows), so the result has exactly `n_select` rows and the same seed gives the same rows.
    """
    if not 1 <= n_select <= total_rows:
        raise ValueError(f"cannot keep {n_select} of {total_rows} rows")
    kept: list[np.ndarray] = []
    projection: torch.Tensor | None = None
    seen = kept_rows = 0
    bar = tqdm(total=n_select, desc="coreset", unit="row", disable=not progress)
    for number, chunk in enumerate(_rechunk(chunks, chunk_rows)):
        if projection is None:
            projection = random_projection(chunk.shape[1], projection_dim, seed)
        seen += chunk.shape[0]
        if seen > total_rows:
            raise ValueError(f"received more than the announced {total_rows} rows")
        # Cumulative rounding keeps the per-chunk shares summing to exactly n_select.
        target = int(round(n_select * seen / total_rows))
        share = min(chunk.shape[0], target - kept_rows)
        if share > 0:
            picked = greedy_k_center(chunk, share, seed=seed + number, projection=projection)
            kept.append(chunk[np.sort(picked)].copy())
            kept_rows += share
            bar.update(share)
    bar.close()
    if seen != total_rows:
        raise ValueError(f"received {seen} rows, {total_rows} were announced")
    return np.concatenate(kept) if len(kept) > 1 else kept[0]
