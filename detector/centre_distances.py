"""How far rows are from a set of centres, the measurement greedy k-center repeats: by
matrix products (exact), through a random projection (an upper bound), or by searching the
centres in a faiss HNSW graph (an upper bound whose cost hardly grows with the centres).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # torch is imported where a bank is sampled or grows
    import torch

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


class ExactCentres:
    """Rows measured by matrix products against the centres picked since they were last
    measured: plain greedy's exact values, at rows x centres x dimensions multiply-adds."""

    def __init__(self, points: torch.Tensor, centres: list[int]) -> None:
        self.points = points
        self.centres: list[int] = []
        self.add(centres)

    def add(self, new: list[int]) -> None:
        """Count the `new` centres (row indices) in."""
        self.centres.extend(int(index) for index in new)

    def measure(self, rows: torch.Tensor | None = None, since: int = 0) -> torch.Tensor:
        """Each row's (all rows' when None) squared distance to its nearest centre among
        those from position `since` on."""
        import torch

        points = self.points if rows is None else self.points[rows]
        return nearest_centre(points, self.points[torch.tensor(self.centres[since:])])


class CentreGraph(ExactCentres):
    """The centres in a faiss HNSW graph, searched for each row's nearest one.

    The distance to the centre the graph finds is an upper bound of the distance to the
    nearest centre: the same value for all but 1 row in 2,000 of the benchmark's ViT
    features (`misses` checks it on the rows given), at a cost that hardly grows with
    the number of centres. Measuring every row against every centre is the whole cost of a
    global pass over 20,000 of them (docs/PERFORMANCE.md). A stale row is searched against
    all centres, not only the newer ones.
    """

    BLOCK_ROWS = 65536  # rows searched at once: a spilled array is read block by block
    MISS_LIMIT = 0.01  # of the rows checked (`misses`); ViT patch features: 0.05 %
    CHECKED_ROWS = 2048
    # faiss's M, efSearch and efConstruction, its defaults. Narrower (8 and 20) took 5-10 %
    # less CPU at 20,000 centres, in one process, for a 0.7 % wider radius: it missed the
    # nearest centre of 0.9 % of the rows, not 0.05 %.
    LINKS = 16
    SEARCH_WIDTH = 16
    BUILD_WIDTH = 40

    def __init__(self, points: torch.Tensor, centres: list[int]) -> None:
        import faiss

        self.graph = faiss.IndexHNSWFlat(points.shape[1], self.LINKS)
        self.graph.hnsw.efSearch = self.SEARCH_WIDTH
        self.graph.hnsw.efConstruction = self.BUILD_WIDTH
        self.vectors = points.numpy()
        super().__init__(points, centres)

    def add(self, new: list[int]) -> None:
        """Link the `new` centres (row indices) into the graph."""
        import faiss

        # faiss links new nodes on several threads in an unspecified order; on one thread
        # the graph, and so the coreset, is the same every time.
        threads = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(1)
        try:
            self.graph.add(self.vectors[np.asarray(new, dtype=np.int64)])
        finally:
            faiss.omp_set_num_threads(threads)
        super().add(new)

    def measure(self, rows: torch.Tensor | None = None, since: int = 0) -> torch.Tensor:
        """Each row's squared distance to the centre the graph finds among all of them."""
        import torch

        if rows is not None:
            return self._search(self.vectors[rows.numpy()])
        total = self.vectors.shape[0]
        return torch.cat(
            [
                self._search(self.vectors[start : start + self.BLOCK_ROWS])
                for start in range(0, total, self.BLOCK_ROWS)
            ]
        )

    def _search(self, vectors: np.ndarray) -> torch.Tensor:
        import torch

        distances, _ = self.graph.search(np.ascontiguousarray(vectors, dtype=np.float32), 1)
        return torch.from_numpy(np.ascontiguousarray(distances[:, 0]))

    def misses(self) -> float:
        """The share of evenly spaced rows whose distance to the centre the graph finds is
        more than 1 % (of the squared distance) above the distance to their nearest centre.
        Rows in clusters nearly orthogonal to each other give a search nothing to follow
        towards the right cluster: 6-38 % missed on random ones (docs/PERFORMANCE.md)."""
        import torch

        total = self.vectors.shape[0]
        spaced = np.linspace(0, total - 1, min(total, self.CHECKED_ROWS)).astype(np.int64)
        checked = torch.from_numpy(np.unique(spaced))
        exact = ExactCentres(self.points, self.centres).measure(checked)
        return float((self.measure(checked) > 1.01 * exact + 1e-6).float().mean())
