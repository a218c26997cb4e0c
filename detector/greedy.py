"""Greedy k-center (farthest-point) selection, the step PatchCore's coreset and a bank's
update share: each new centre is the row farthest from every centre so far. On torch
tensors, optionally on a seeded random projection; `continue_greedy` continues plain greedy
from given centres while measuring only the rows that could be picked.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # torch is imported where a bank is sampled or grows
    import torch


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


BLOCK_BYTES = 64 << 20  # a block of points x centres distances: 16,384 rows at 1,024 centres


def _block_rows(centres: int) -> int:
    """Rows per block so that one block's distances to every centre stay within BLOCK_BYTES
    (20,000 centres would make a 16,384-row block 1.3 GB)."""
    return max(256, BLOCK_BYTES // (4 * max(1, centres)))


def nearest_centre(points: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """Each point's squared Euclidean distance to its nearest centre, by matrix products."""
    import torch

    block = _block_rows(centres.shape[0])
    point_norms = (points * points).sum(dim=1)
    centre_norms = (centres * centres).sum(dim=1)
    nearest = torch.empty(points.shape[0])
    for start in range(0, points.shape[0], block):
        part = points[start : start + block]
        squared = point_norms[start : start + block, None] - 2.0 * part @ centres.T
        nearest[start : start + block] = (squared + centre_norms[None]).min(dim=1).values
    return nearest


def bounded_nearest(
    points: torch.Tensor, centres: torch.Tensor, projection: torch.Tensor
) -> torch.Tensor:
    """Each point's exact squared distance to the centre that is nearest on the projection:
    an upper bound of its distance to the nearest centre, at a fraction of the cost of
    measuring every centre in full (the few points whose bound matters are measured later)."""
    import torch

    block = _block_rows(centres.shape[0])
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
    per_round: int | None = None,
) -> tuple[np.ndarray, float]:
    """`count` more centres, exactly as plain greedy continues from `selected`, and the
    covering radius after them (Euclidean). With a `projection`, rows start from upper
    bounds (`bounded_nearest`) instead of their exact distances. `per_round` centres at most
    are picked per round (None: all at once); the choices are the same either way.

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
        return _worst_up_to_date(points, nearest, measured, centres, searched)

    while len(picked) < count:
        wanted = count - len(picked) if per_round is None else min(per_round, count - len(picked))
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


def _worst_up_to_date(
    points: torch.Tensor,
    nearest: torch.Tensor,
    measured: torch.Tensor,
    centres: list[int],
    searched: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The `searched` rows farthest from every centre, each measured against all of them:
    stale rows among the worst are measured against the centres picked since (in place),
    until the worst ones are all up to date."""
    import torch

    while True:
        worst, rows = torch.topk(nearest, searched)
        stale = rows[measured[rows] < len(centres)]
        if not len(stale):
            return worst, rows
        since = int(measured[stale].min())
        newer = torch.tensor(centres[since:])
        nearest[stale] = torch.minimum(nearest[stale], nearest_centre(points[stale], points[newer]))
        measured[stale] = len(centres)
