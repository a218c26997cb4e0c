"""Greedy k-center (farthest-point) selection, the step PatchCore's coreset and a bank's
update share: each new centre is the row farthest from every centre so far. On torch
tensors, optionally on a seeded random projection; `continue_greedy` continues plain greedy
from given centres while measuring only the rows that could be picked
(`detector.centre_distances`).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np

from detector.centre_distances import CentreGraph, ExactCentres, bounded_nearest

if TYPE_CHECKING:  # torch is imported where a bank is sampled or grows
    import torch

log = logging.getLogger(__name__)


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


# Rows a round searches: 4 per centre it picks, and at least a 100th of all rows; measured
# fastest of 4 or 8 per centre and a 20th, 50th or 100th, at 2,000 and 20,000 centres.
SEARCHED_PER_PICK = 4
SEARCHED_SHARE = 100


def continue_greedy(
    points: torch.Tensor,
    selected: np.ndarray,
    count: int,
    projection: torch.Tensor | None = None,
    per_round: int | None = None,
    graph: bool = False,
) -> tuple[np.ndarray, float]:
    """`count` more centres, as plain greedy continues from `selected`, and the exact
    covering radius after them (Euclidean). With a `projection`, rows start from upper
    bounds (`bounded_nearest`) instead of their exact distances. With `graph`, rows are
    measured by searching a `CentreGraph` instead (the projection unused): plain greedy's
    choices but where the graph misses a row's nearest centre; the graph is checked when it
    starts and each time its centres double, and gives way to matrix products when it
    misses too often. `per_round` centres at most are picked per round (None: all at once);
    without a graph the choices are the same either way.

    Greedy always picks the row farthest from every centre, so only the worst-covered rows
    need to know their exact distance. Each round searches the rows that currently look
    worst; a row's value may be stale (not yet measured against centres picked since), but
    a stale value is an upper bound, so measuring the stale rows among the worst ones until
    the worst ones are all up to date gives exactly plain greedy's choices, while most rows
    are never measured against most centres.
    """
    import torch

    rows_total = points.shape[0]
    search, nearest, measured = _start(points, selected, projection, graph)
    proven_at = len(selected)  # the graph is checked again each time its centres double
    nearest[torch.from_numpy(selected)] = -1.0
    picked: list[int] = []
    while len(picked) < count:
        wanted = count - len(picked) if per_round is None else min(per_round, count - len(picked))
        searched = min(rows_total, max(SEARCHED_PER_PICK * wanted, rows_total // SEARCHED_SHARE))
        worst, rows = _worst_up_to_date(search, nearest, measured, searched)
        left_out = float(worst[-1]) if searched < rows_total else -1.0
        radius = float(np.sqrt(left_out)) if left_out > 0 else None
        subset = nearest[rows].clone()
        found = farthest_points(points[rows], subset, wanted, radius=radius)
        nearest[rows] = subset
        if not len(found):
            break  # every row is a centre already, or all remaining rows coincide
        new = rows[torch.from_numpy(found)].tolist()
        picked.extend(new)
        search.add(new)
        measured[rows] = len(search.centres)  # the subset was measured against each new one
        if isinstance(search, CentreGraph) and len(search.centres) >= 2 * proven_at:
            proven_at, search = len(search.centres), _proven(search)
            if not isinstance(search, CentreGraph):  # every value so far: an upper bound
                measured.zero_()
    return np.asarray(picked, dtype=np.int64), _exact_radius(search, nearest, measured)


def _start(
    points: torch.Tensor, selected: np.ndarray, projection: torch.Tensor | None, graph: bool
) -> tuple[ExactCentres, torch.Tensor, torch.Tensor]:
    """How rows will be measured, each row's starting value, and how many of the centres
    that value accounts for (0: an upper bound only, measured against all when it matters).
    A graph measures rows only once it has proved itself (`_proven`)."""
    import torch

    measured = torch.full((points.shape[0],), len(selected), dtype=torch.long)
    if graph:
        # The graph's values start the rows either way: upper bounds cheaper than the
        # projection's (1M rows from 3,500 centres: 115 s in all, not 141 s).
        centre_graph = CentreGraph(points, selected.tolist())
        search = _proven(centre_graph)
        nearest = centre_graph.measure()
        proven = isinstance(search, CentreGraph)
        return search, nearest, measured if proven else measured.zero_()
    search = ExactCentres(points, selected.tolist())
    if projection is None:
        return search, search.measure(), measured
    starting = points[torch.from_numpy(selected)]
    return search, bounded_nearest(points, starting, projection), measured.zero_()


def _proven(graph: CentreGraph) -> ExactCentres:
    """The graph, unless it misses the nearest centre of too many rows: then greedy would
    spend centres on rows already covered, so rows are measured by matrix products instead
    (slower), with one line in the log."""
    missed = graph.misses()
    if missed <= graph.MISS_LIMIT:
        return graph
    log.warning(
        "the centres' graph missed the nearest centre of %.1f %% of the rows checked "
        "(more than %.0f %%): measuring rows by matrix products instead, slower",
        100 * missed,
        100 * graph.MISS_LIMIT,
    )
    return ExactCentres(graph.points, graph.centres)


def _worst_up_to_date(
    search: ExactCentres, nearest: torch.Tensor, measured: torch.Tensor, searched: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The `searched` rows farthest from every centre, each measured against all of them:
    stale rows among the worst are measured against the centres picked since (in place),
    until the worst ones are all up to date."""
    import torch

    while True:
        worst, rows = torch.topk(nearest, searched)
        stale = rows[measured[rows] < len(search.centres)]
        if not len(stale):
            return worst, rows
        since = int(measured[stale].min())
        nearest[stale] = torch.minimum(nearest[stale], search.measure(stale, since))
        measured[stale] = len(search.centres)


def _exact_radius(search: ExactCentres, nearest: torch.Tensor, measured: torch.Tensor) -> float:
    """The largest distance from a row to its nearest centre: the worst rows' values
    measured exactly until the worst is (the graph's values are upper bounds)."""
    import torch

    graph = isinstance(search, CentreGraph)
    exact = ExactCentres(search.points, search.centres) if graph else search
    checked = torch.zeros(len(nearest), dtype=torch.bool)
    if not graph:
        _worst_up_to_date(search, nearest, measured, 1)
        checked = measured >= len(search.centres)
    while True:
        worst, rows = torch.topk(nearest, min(256, len(nearest)))
        if bool(checked[rows[0]]):
            return float(np.sqrt(max(float(worst[0]), 0.0)))
        todo = rows[~checked[rows]]
        nearest[todo] = torch.minimum(nearest[todo], exact.measure(todo))
        checked[todo] = True
