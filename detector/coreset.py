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
   distance to the centres (its exact distance to the centre nearest on the projection, or
   above `global_limit` to the centre a graph search finds), and only the rows that look
   worst are measured against every centre and searched. An
   update of a fitted bank runs the same farthest-point step (`farthest_points`).

The result keeps plain greedy's property where it matters: the worst-covered rows get
centres. Above `DEFAULT_GLOBAL_LIMIT` centres the sample in step 2 would itself cost about
what plain greedy does (4 x 10,000 rows, greedily, for 20,000 centres), so the first
`CHUNKED_SHARE` of the centres comes from each chunk's own share instead (greedy within a
chunk of 16,384 rows, which stays in the CPU's cache), and step 3 continues from there over
all rows, `CONTINUE_ROUND` centres per round (a round searches 4 x its centres of the worst
rows). There, measuring rows against every centre by matrix products would be most of the
cost (200k x 10,000 x 384 multiply-adds for the starting values alone), so rows are measured
by searching the centres in a faiss HNSW graph instead (`CentreGraph`): at 10 % of 200k rows
about 3 x faster than by matrix products, and 10 x plain greedy's speed (docs/PERFORMANCE.md),
where the graph proves it finds the nearest centre (else matrix products, slower). Each
chunk keeping its share alone, the fit's way above 4,096 centres before, covered 2.5 x worse.

The bank records its covering radius (the largest cosine distance from a training row to
its nearest centre), so an update adds exactly the new patches the bank does not already
cover as tightly as its own training patches.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from tqdm import tqdm

from detector.greedy import continue_greedy, greedy_k_center, random_projection
from detector.spill import DEFAULT_IN_MEMORY_BYTES, Spill

if TYPE_CHECKING:  # imported where a sampler runs: serving's API process never loads torch
    import torch

DEFAULT_CHUNK_ROWS = 16384
DEFAULT_PROJECTION_DIM = 128
DEFAULT_OVERSAMPLE = 4  # the random sample the first half of the centres comes from

DEFAULT_GLOBAL_LIMIT = 4096  # centres up to which the start comes from a sample
SAMPLED_SHARE = 0.5  # of the centres, picked from the sample before the global pass
CHUNKED_SHARE = 0.35  # of the centres, from the chunks' shares (above `global_limit`)
CONTINUE_ROUND = 512  # centres per round of the global pass


@dataclass(frozen=True)
class Coreset:
    """The kept rows, and how tightly they cover what they were chosen from."""

    rows: np.ndarray
    indices: np.ndarray  # each kept row's position in the stream it was chosen from
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
    oversample: int = DEFAULT_OVERSAMPLE,
    in_memory_bytes: int = DEFAULT_IN_MEMORY_BYTES,
    global_limit: int = DEFAULT_GLOBAL_LIMIT,
    progress: bool = True,
) -> Coreset:
    """Keep `n_select` of `total_rows` streamed, L2-normalised feature rows; the same seed
    gives the same rows.

    The rows are kept (in memory up to `in_memory_bytes`, beyond in a temporary file the
    page cache serves) for the global greedy pass. It starts from centres picked in a random
    sample up to `global_limit` centres, from each chunk's share beyond it.
    """
    import torch

    if not 1 <= n_select <= total_rows:
        raise ValueError(f"cannot keep {n_select} of {total_rows} rows")
    spill: Spill | None = None
    seen = 0
    bar = tqdm(total=total_rows, desc="coreset", unit="row", disable=not progress)
    try:
        for chunk in _rechunk(chunks, chunk_rows):
            if spill is None:
                spill = Spill((total_rows, chunk.shape[1]), in_memory_bytes, "coreset-")
            if seen + chunk.shape[0] > total_rows:
                raise ValueError(f"received more than the announced {total_rows} rows")
            spill.array[seen : seen + chunk.shape[0]] = chunk
            seen += chunk.shape[0]
            bar.update(chunk.shape[0])
        bar.close()
        if seen != total_rows or spill is None:
            raise ValueError(f"received {seen} rows, {total_rows} were announced")
        projection = random_projection(spill.array.shape[1], projection_dim, seed)
        many = n_select > global_limit
        if many:
            first = max(1, int(n_select * CHUNKED_SHARE))
            start = chunk_share_indices(spill.array, first, seed, chunk_rows, projection)
        else:
            start = _sample_start(spill, n_select, seed, oversample, projection)
        rows = torch.from_numpy(spill.array)
        remaining = n_select - len(start)
        finish, radius = continue_greedy(
            rows, start, remaining, projection, CONTINUE_ROUND, graph=many
        )
        # Unit vectors: squared Euclidean distance = 2 x cosine distance.
        kept = np.sort(np.concatenate([start, finish]))  # the order `take` gives rows in
        return Coreset(spill.take(kept), kept, radius * radius / 2.0)
    finally:
        if spill is not None:
            spill.close()


def _sample_start(
    spill: Spill, n_select: int, seed: int, oversample: int, projection: torch.Tensor | None
) -> np.ndarray:
    """The first `SAMPLED_SHARE` of the centres, by greedy k-center on a random sample."""
    total_rows = spill.array.shape[0]
    rng = np.random.default_rng(seed)
    wanted = min(total_rows, oversample * n_select)
    sample = np.sort(rng.choice(total_rows, wanted, replace=False))
    first = max(1, int(n_select * SAMPLED_SHARE))
    picked = greedy_k_center(spill.take(sample), first, seed=seed, projection=projection)
    return sample[picked]


def chunk_share_indices(
    rows: np.ndarray,
    n_select: int,
    seed: int = 0,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    projection: torch.Tensor | None = None,
) -> np.ndarray:
    """Indices of `n_select` rows, each chunk of `chunk_rows` giving its share by greedy
    k-center within itself (on `projection`): the global pass's start above `global_limit`
    centres, and on their own the fit's coreset there before."""
    total = rows.shape[0]
    picked: list[np.ndarray] = []
    kept = 0
    for number, begin in enumerate(range(0, total, chunk_rows)):
        chunk = np.asarray(rows[begin : begin + chunk_rows], dtype=np.float32)
        # Cumulative rounding keeps the shares summing to exactly n_select.
        share = min(len(chunk), int(round(n_select * (begin + len(chunk)) / total)) - kept)
        if share > 0:
            chosen = greedy_k_center(chunk, share, seed=seed + number, projection=projection)
            picked.append(begin + chosen)
            kept += share
    return np.concatenate(picked)
