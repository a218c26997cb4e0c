"""Greedy k-center coreset (PatchCore) close to plain greedy's coverage in seconds on a CPU,
from features that stream in, and extendable later without refitting.

Plain greedy k-center touches every patch once per selected centre: 27 s for 200k rows at
1 % on 2 cores even on a 128-d projection. Choosing centres per chunk of images is fast but
spends centres on patterns every chunk shares: its covering radius was 41 % above plain
greedy's on 13 chunks of ViT features (docs/PERFORMANCE.md). Here:

1. rows stream in once and are kept (L2-normalised; in a temporary file when large);
2. greedy k-center on a random sample (`oversample` x the centres wanted, on a seeded random
   projection) picks the first half of the centres: the bulk of the coverage, cheaply;
3. greedy continues over *all* rows from those centres for the second half, exactly as plain
   greedy would continue (`continue_greedy`): every row starts with an upper bound of its
   distance to the centres (its exact distance to the centre nearest on the projection),
   and only the rows that look worst are measured against every centre and searched. An
   update of a fitted bank runs the same farthest-point step (`farthest_points`).

The result keeps plain greedy's property where it matters: the worst-covered rows get
centres. Step 3's bounds still cost rows x centres on the projection, so above
`DEFAULT_GLOBAL_LIMIT` centres each chunk keeps its own share instead: with that many
centres per chunk the global pass gains little.

The bank records its covering radius (the largest cosine distance from a training row to
its nearest centre), so an update adds exactly the new patches the bank does not already
cover as tightly as its own training patches.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm import tqdm

if TYPE_CHECKING:  # imported where a sampler runs: serving's API process never loads torch
    import torch

DEFAULT_CHUNK_ROWS = 16384
DEFAULT_PROJECTION_DIM = 128
DEFAULT_OVERSAMPLE = 4  # the random sample the first half of the centres comes from
DEFAULT_IN_MEMORY_BYTES = 512 << 20  # normalised rows above this go to a temporary file
DEFAULT_GLOBAL_LIMIT = 4096  # centres up to which the global greedy pass runs
SAMPLED_SHARE = 0.5  # of the centres, picked on the random sample before the global pass


@dataclass(frozen=True)
class Coreset:
    """The kept rows, and how tightly they cover what they were chosen from."""

    rows: np.ndarray
    radius: float  # largest cosine distance from a training row to its nearest kept row


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
    import torch

    if projection_dim <= 0 or projection_dim >= dim:
        return None
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(dim, projection_dim, generator=generator) / np.sqrt(projection_dim)


def _points(features: np.ndarray, projection: torch.Tensor | None) -> torch.Tensor:
    import torch

    points = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))
    return points @ projection if projection is not None else points


def farthest_points(
    points: torch.Tensor,
    nearest: torch.Tensor,
    count: int,
    *,
    radius: float | None = None,
    first: int | None = None,
) -> np.ndarray:
    """Greedy farthest-point selection (Gonzalez, 1985) continued from `nearest`, each point's
    squared distance to the centres chosen so far (inf: none yet); updated in place.

    Stops after `count` picks, or once every point is within `radius` (Euclidean) of a centre.
    """
    import torch

    squared_norms = (points * points).sum(dim=1)
    limit = -1.0 if radius is None else radius * radius
    selected: list[int] = []
    index = int(torch.argmax(nearest)) if first is None else first
    while len(selected) < count and (first is not None and not selected or nearest[index] > limit):
        selected.append(index)
        distances = squared_norms - 2.0 * torch.mv(points, points[index]) + squared_norms[index]
        torch.minimum(nearest, distances, out=nearest)
        nearest[index] = -1.0  # never pick a centre twice, even with duplicate rows
        index = int(torch.argmax(nearest))
    return np.asarray(selected, dtype=np.int64)


def greedy_k_center(
    features: np.ndarray, n_select: int, *, seed: int = 0, projection: torch.Tensor | None = None
) -> np.ndarray:
    """Indices of `n_select` rows chosen by plain greedy k-center from a seeded first row."""
    import torch

    rows = features.shape[0]
    if n_select >= rows:
        return np.arange(rows)
    first = int(np.random.default_rng(seed).integers(rows))
    nearest = torch.full((rows,), float("inf"))
    return farthest_points(_points(features, projection), nearest, n_select, first=first)


def covering_radius(rows: np.ndarray, centres: np.ndarray) -> float:
    """Largest cosine distance from an L2-normalised row to its nearest centre, by faiss."""
    import faiss  # the memory bank's search, so the radius is measured as scores are

    index = faiss.IndexFlatIP(centres.shape[1])
    index.add(np.ascontiguousarray(centres, dtype=np.float32))
    similarities, _ = index.search(np.ascontiguousarray(rows, dtype=np.float32), 1)
    return float(max(0.0, 1.0 - float(similarities.min()))) if len(rows) else 0.0


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


def nearest_centre(points: torch.Tensor, centres: torch.Tensor, block: int = 16384) -> torch.Tensor:
    """Each point's squared Euclidean distance to its nearest centre, by matrix products."""
    import torch

    point_norms = (points * points).sum(dim=1)
    centre_norms = (centres * centres).sum(dim=1)
    nearest = torch.empty(points.shape[0])
    for start in range(0, points.shape[0], block):
        part = points[start : start + block]
        squared = point_norms[start : start + block, None] - 2.0 * part @ centres.T
        nearest[start : start + block] = (squared + centre_norms[None]).min(dim=1).values
    return nearest


def bounded_nearest(
    points: torch.Tensor, centres: torch.Tensor, projection: torch.Tensor, block: int = 16384
) -> torch.Tensor:
    """Each point's exact squared distance to the centre that is nearest on the projection:
    an upper bound of its distance to the nearest centre, at a fraction of the cost of
    measuring every centre in full (the few points whose bound matters are measured later)."""
    import torch

    projected_centres = centres @ projection
    centre_norms = (projected_centres * projected_centres).sum(dim=1)
    bound = torch.empty(points.shape[0])
    for start in range(0, points.shape[0], block):
        part = points[start : start + block]
        projected = part @ projection
        scores = centre_norms[None] - 2.0 * projected @ projected_centres.T
        assigned = centres[scores.argmin(dim=1)]
        bound[start : start + block] = ((part - assigned) ** 2).sum(dim=1)
    return bound


def continue_greedy(
    points: torch.Tensor,
    selected: np.ndarray,
    count: int,
    projection: torch.Tensor | None = None,
) -> tuple[np.ndarray, float]:
    """`count` more centres, exactly as plain greedy continues from `selected`, and the
    covering radius after them (Euclidean). With a `projection`, rows start from upper
    bounds (`bounded_nearest`) instead of their exact distances.

    Greedy always picks the row farthest from every centre, so only the worst-covered rows
    need to know their exact distance. Each round searches the rows that currently look
    worst; a row's value may be stale (not yet measured against centres picked since), but
    a stale value is an upper bound, so measuring the stale rows among the worst ones until
    the worst ones are all up to date gives exactly plain greedy's choices, while most rows
    are never measured against most centres.
    """
    import torch

    rows_total = points.shape[0]
    starting = points[torch.from_numpy(selected)]
    centres = [int(index) for index in selected]
    # How many of `centres` each row's value accounts for (0: an upper bound only).
    if projection is None:
        nearest = nearest_centre(points, starting)
        measured = torch.full((rows_total,), len(centres), dtype=torch.long)
    else:
        nearest = bounded_nearest(points, starting, projection)
        measured = torch.zeros(rows_total, dtype=torch.long)
    nearest[torch.from_numpy(selected)] = -1.0
    picked: list[int] = []

    def worst_up_to_date(searched: int) -> tuple[torch.Tensor, torch.Tensor]:
        while True:
            worst, rows = torch.topk(nearest, searched)
            stale = rows[measured[rows] < len(centres)]
            if not len(stale):
                return worst, rows
            since = int(measured[stale].min())
            newer = torch.tensor(centres[since:])
            nearest[stale] = torch.minimum(
                nearest[stale], nearest_centre(points[stale], points[newer])
            )
            measured[stale] = len(centres)

    while len(picked) < count:
        wanted = count - len(picked)
        searched = min(rows_total, max(8 * wanted, rows_total // 20))
        worst, rows = worst_up_to_date(searched)
        left_out = float(worst[-1]) if searched < rows_total else -1.0
        radius = float(np.sqrt(left_out)) if left_out > 0 else None
        subset = nearest[rows].clone()
        found = farthest_points(points[rows], subset, wanted, radius=radius)
        nearest[rows] = subset
        if not len(found):
            break  # every row is a centre already, or all remaining rows coincide
        new = rows[torch.from_numpy(found)].tolist()
        picked.extend(new)
        centres.extend(new)
        measured[rows] = len(centres)  # the subset was measured against each new centre
    worst, _ = worst_up_to_date(1)
    return np.asarray(picked, dtype=np.int64), float(np.sqrt(max(float(worst[0]), 0.0)))


class _Spill:
    """The normalised rows as they stream in: in memory when small, else in a temporary file
    (a memory map), so fitting on many images holds only their projection in memory."""

    def __init__(self, rows: int, dim: int, limit_bytes: int) -> None:
        self._file = None
        if rows * dim * 4 > limit_bytes:
            self._file = tempfile.TemporaryFile(prefix="coreset-")  # noqa: SIM115 (closed in take)
            self.rows: Any = np.memmap(self._file, dtype=np.float32, mode="w+", shape=(rows, dim))
        else:
            self.rows = np.empty((rows, dim), dtype=np.float32)

    def take(self, indices: np.ndarray) -> np.ndarray:
        taken = np.asarray(self.rows[np.sort(indices)], dtype=np.float32)
        if self._file is not None:
            del self.rows
            self._file.close()
        return taken


def streaming_coreset(
    chunks: Iterable[np.ndarray],
    total_rows: int,
    n_select: int,
    *,
    seed: int = 0,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    projection_dim: int = DEFAULT_PROJECTION_DIM,
    oversample: int = DEFAULT_OVERSAMPLE,
    in_memory_bytes: int = DEFAULT_IN_MEMORY_BYTES,
    global_limit: int = DEFAULT_GLOBAL_LIMIT,
    progress: bool = True,
) -> Coreset:
    """Keep `n_select` of `total_rows` streamed, L2-normalised feature rows; the same seed
    gives the same rows.

    Up to `global_limit` centres, the rows are kept (in memory up to `in_memory_bytes`,
    beyond in a temporary file the page cache serves) for the global greedy pass. Beyond
    it, every chunk keeps its own share (`chunk_shares`): the global pass measures every row
    against every centre, a cost that grows with their product, while with that many
    centres each chunk holds enough of them that the pass gains little.
    """
    import torch

    if not 1 <= n_select <= total_rows:
        raise ValueError(f"cannot keep {n_select} of {total_rows} rows")
    if n_select > global_limit:
        return chunk_shares(
            chunks, total_rows, n_select, seed, chunk_rows, projection_dim, progress
        )
    spill: _Spill | None = None
    seen = 0
    bar = tqdm(total=total_rows, desc="coreset", unit="row", disable=not progress)
    for chunk in _rechunk(chunks, chunk_rows):
        if spill is None:
            spill = _Spill(total_rows, chunk.shape[1], in_memory_bytes)
        if seen + chunk.shape[0] > total_rows:
            raise ValueError(f"received more than the announced {total_rows} rows")
        spill.rows[seen : seen + chunk.shape[0]] = chunk
        seen += chunk.shape[0]
        bar.update(chunk.shape[0])
    bar.close()
    if seen != total_rows or spill is None:
        raise ValueError(f"received {seen} rows, {total_rows} were announced")
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(total_rows, min(total_rows, oversample * n_select), replace=False))
    projection = random_projection(spill.rows.shape[1], projection_dim, seed)
    rows = np.asarray(spill.rows[sample])
    first = max(1, int(n_select * SAMPLED_SHARE))
    start = sample[greedy_k_center(rows, first, seed=seed, projection=projection)]
    finish, radius = continue_greedy(
        torch.from_numpy(spill.rows), start, n_select - len(start), projection
    )
    # Unit vectors: squared Euclidean distance = 2 x cosine distance.
    return Coreset(spill.take(np.concatenate([start, finish])), radius * radius / 2.0)


def chunk_shares(
    chunks: Iterable[np.ndarray],
    total_rows: int,
    n_select: int,
    seed: int = 0,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    projection_dim: int = DEFAULT_PROJECTION_DIM,
    progress: bool = True,
) -> Coreset:
    """Each chunk's share of the centres by greedy k-center on that chunk (on a projection);
    memory holds one chunk and the kept rows. The radius is the largest chunk's own, measured
    exactly: an upper bound, since another chunk's centre may be nearer."""
    import torch

    kept: list[np.ndarray] = []
    projection: torch.Tensor | None = None
    seen = kept_rows = 0
    radius_sq = 0.0
    bar = tqdm(total=total_rows, desc="coreset", unit="row", disable=not progress)
    for number, chunk in enumerate(_rechunk(chunks, chunk_rows)):
        if projection is None:
            projection = random_projection(chunk.shape[1], projection_dim, seed)
        seen += chunk.shape[0]
        if seen > total_rows:
            raise ValueError(f"received more than the announced {total_rows} rows")
        # Cumulative rounding keeps the per-chunk shares summing to exactly n_select.
        share = min(chunk.shape[0], int(round(n_select * seen / total_rows)) - kept_rows)
        if share > 0:
            picked = np.sort(
                greedy_k_center(chunk, share, seed=seed + number, projection=projection)
            )
            points = torch.from_numpy(np.ascontiguousarray(chunk))
            nearest = nearest_centre(points, points[torch.from_numpy(picked)])
            radius_sq = max(radius_sq, float(nearest.max()))
            kept.append(chunk[picked].copy())
            kept_rows += share
        bar.update(chunk.shape[0])
    bar.close()
    if seen != total_rows:
        raise ValueError(f"received {seen} rows, {total_rows} were announced")
    rows = np.concatenate(kept) if len(kept) > 1 else kept[0]
    return Coreset(rows, max(radius_sq, 0.0) / 2.0)
