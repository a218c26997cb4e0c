"""Memory bank of normal patch features: coreset selection, a faiss index, k-NN distances.

It only sees float32 arrays, so any feature extractor can fill it. Features are
L2-normalised, so inner product is cosine similarity and a patch's distance is
1 - cosine similarity to its nearest normal patches (AnomalyDINO's choice).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from detector.coreset import (
    DEFAULT_CHUNK_ROWS,
    DEFAULT_GLOBAL_LIMIT,
    DEFAULT_OVERSAMPLE,
    DEFAULT_PROJECTION_DIM,
    coreset_size,
    streaming_coreset,
)
from detector.greedy import farthest_points
from detector.provenance import Provenance

INDEX_FILE = "index.faiss"
METADATA_FILE = "bank.json"


@dataclass
class BankConfig:
    """How the bank is built and searched; stored with the bank so a reload behaves the same."""

    coreset_ratio: float | None = 0.01
    coreset_size: int | None = None
    index: str = "flat"  # flat (exact) | hnsw | ivf (approximate, for large banks)
    k: int = 1
    hnsw_m: int = 32
    hnsw_ef_search: int = 128
    ivf_nlist: int = 256
    ivf_nprobe: int = 16
    seed: int = 0
    chunk_rows: int = DEFAULT_CHUNK_ROWS
    projection_dim: int = DEFAULT_PROJECTION_DIM
    oversample: int = DEFAULT_OVERSAMPLE
    global_limit: int = DEFAULT_GLOBAL_LIMIT  # more centres: the global pass starts from chunks


# bank.json's layout: 1 (no format_version) is what banks were saved as before it was kept.
FORMAT_VERSION = 2


def upgraded(document: dict[str, Any], source: str | Path = "bank.json") -> dict[str, Any]:
    """A bank.json of any format this code knows, as the current format: the one place that
    knows what older banks lack (everything else reads the current layout). A bank saved by
    a newer version of this project is refused with a sentence, never half-read."""
    version = int(document.get("format_version", 1))
    if version > FORMAT_VERSION:
        raise ValueError(
            f"{source} was saved in bank format {version}; this version reads up to "
            f"{FORMAT_VERSION}: upgrade this project, or refit the bank with this version."
        )
    document = dict(document)
    if version < 2:  # before fingerprints, rules, sources and the bank's own config keys
        extractor = dict(document.get("extractor") or {})
        extractor.setdefault("layers", [-1])
        extractor.setdefault("fingerprint", None)
        if "backbone" not in extractor and "source" in extractor:
            extractor["backbone"] = extractor.pop("source")
        document["extractor"] = extractor
        calibration = dict(document.get("calibration") or {})
        calibration.setdefault("rule", "empirical_quantile")
        calibration.setdefault("source", "held_out")
        document["calibration"] = calibration
        document.setdefault("scoring", {})
        document.setdefault("bank", {})
    document["format_version"] = FORMAT_VERSION
    return document


def l2_normalize(features: np.ndarray) -> np.ndarray:
    features = np.ascontiguousarray(features, dtype=np.float32).reshape(-1, features.shape[-1])
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    return features / np.maximum(norms, 1e-12)


def build_index(vectors: np.ndarray, config: BankConfig) -> faiss.Index:
    dim = vectors.shape[1]
    if config.index == "flat":
        index = faiss.IndexFlatIP(dim)
    elif config.index == "hnsw":
        index = faiss.IndexHNSWFlat(dim, config.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = config.hnsw_ef_search
    elif config.index == "ivf":
        nlist = max(1, min(config.ivf_nlist, vectors.shape[0] // 39))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = config.seed
        index.train(vectors)
        index.nprobe = min(config.ivf_nprobe, nlist)
    else:
        raise ValueError(f"unknown index type {config.index!r}: use flat, hnsw or ivf")
    index.add(vectors)
    return index


@dataclass
class MemoryBank:
    """A searchable set of normal patch features plus the metadata needed to use it later."""

    index: faiss.Index
    config: BankConfig
    metadata: dict[str, Any] = field(default_factory=dict)
    # Where each row came from (None: saved before that was kept); a fit sets it from
    # `kept_rows`, the positions of the kept rows in the stream it was fitted from.
    provenance: Provenance | None = None
    kept_rows: np.ndarray | None = field(default=None, repr=False)

    @classmethod
    def fit(cls, features: np.ndarray, config: BankConfig | None = None) -> MemoryBank:
        """Fit from an in-memory (N, D) array (or any array whose last axis is D)."""
        flat = np.asarray(features, dtype=np.float32).reshape(-1, features.shape[-1])
        step = (config or BankConfig()).chunk_rows
        blocks = (flat[start : start + step] for start in range(0, flat.shape[0], step))
        return cls.fit_stream(blocks, flat.shape[0], config)

    @classmethod
    def fit_stream(
        cls,
        blocks: Iterable[np.ndarray],
        total_rows: int,
        config: BankConfig | None = None,
        progress: bool = True,
    ) -> MemoryBank:
        """Fit from feature blocks as they are extracted, never holding the full feature set."""
        config = config or BankConfig()
        keep = coreset_size(total_rows, config.coreset_ratio, config.coreset_size)
        coreset = streaming_coreset(
            (l2_normalize(block) for block in blocks),
            total_rows,
            keep,
            seed=config.seed,
            chunk_rows=config.chunk_rows,
            projection_dim=config.projection_dim,
            oversample=config.oversample,
            global_limit=config.global_limit,
            progress=progress,
        )
        bank = cls(build_index(coreset.rows, config), config, kept_rows=coreset.indices)
        bank.metadata.update(
            n_train_features=int(total_rows),
            bank_size=int(coreset.rows.shape[0]),
            covering_radius=coreset.radius,
        )
        return bank

    # ----- learning ---------------------------------------------------------------------
    def copy(self) -> MemoryBank:
        """An independent bank to extend while this one keeps serving."""
        return MemoryBank(
            faiss.clone_index(self.index),
            self.config,
            copy.deepcopy(self.metadata),
            self.provenance,  # never changed in place: `extend` makes a new one
        )

    def vectors(self) -> np.ndarray:
        """The bank's rows (for flat and HNSW indexes as stored; IVF needs a direct map)."""
        if self.config.index == "ivf":
            faiss.extract_index_ivf(self.index).make_direct_map()
        return self.index.reconstruct_n(0, self.size)

    @property
    def covering_radius(self) -> float:
        """How tightly the bank covers its own training patches (cosine distance).

        Banks fitted before the radius was recorded estimate it from their spacing: greedy
        k-center only picks a centre farther than the final radius from every other one, so
        the closest pair of distinct rows is an upper bound that greedy banks nearly meet.
        """
        if "covering_radius" in self.metadata:
            return float(self.metadata["covering_radius"])
        rows = self.vectors()
        probe = faiss.IndexFlatIP(self.dim)
        probe.add(rows)
        similarities, _ = probe.search(rows, min(2, self.size))
        distances = 1.0 - similarities[:, -1]
        distinct = distances[distances > 1e-6]
        return float(distinct.min()) if distinct.size else 0.0

    def extend(
        self,
        features: np.ndarray,
        radius: float | None = None,
        names: Sequence[str] | None = None,
    ) -> int:
        """Add the new patches the bank does not already cover within its covering radius;
        returns how many rows were added.

        Greedy k-center continued from the existing rows: the new patch farthest from the bank
        becomes a row, then the next farthest from the bank plus it, until every new patch is
        as close to a row as the training patches were (or within `radius`, a cosine
        distance, when given). An image flagged by a false alarm gains rows where it was
        flagged and nowhere else. `names` (one per image of a (B, h, w, D) `features`) say
        where the new rows came from.
        """
        new = l2_normalize(features)
        finite = np.flatnonzero(np.isfinite(new).all(axis=1))
        new = new[finite]
        if not len(new):
            return 0
        import torch  # only where a bank grows: serving's API process never loads it

        similarities, _ = self.index.search(new, 1)
        # Squared Euclidean distance between unit vectors: 2 - 2 cos.
        nearest = torch.from_numpy(np.maximum(2.0 - 2.0 * similarities[:, 0], 0.0))
        tightness = self.covering_radius if radius is None else radius
        euclidean = float(np.sqrt(2.0 * max(tightness, 0.0)))
        picked = farthest_points(torch.from_numpy(new), nearest, len(new), radius=euclidean)
        if len(picked):
            chosen = np.sort(picked)
            self.index.add(new[chosen])
            if self.provenance is not None:
                self.provenance = self.provenance.extended(
                    len(chosen), names, finite[chosen], features.shape[1:-1]
                )
        self.metadata["bank_size"] = self.size
        return int(len(picked))

    @property
    def size(self) -> int:
        return int(self.index.ntotal)

    @property
    def dim(self) -> int:
        return int(self.index.d)

    def nearest(self, query: np.ndarray) -> tuple[int, float]:
        """The bank row nearest to one feature row, and its cosine distance."""
        similarities, rows = self.index.search(l2_normalize(query[None]), 1)
        return int(rows[0, 0]), float(1.0 - similarities[0, 0])

    def distances(self, queries: np.ndarray) -> np.ndarray:
        """Cosine distance of each query row to its k nearest bank rows, averaged over k."""
        shape = queries.shape[:-1]
        if queries.shape[-1] != self.dim:
            raise ValueError(f"queries have dimension {queries.shape[-1]}, the bank has {self.dim}")
        normalized = l2_normalize(queries)
        similarities, _ = self.index.search(normalized, min(self.config.k, self.size))
        distances = (1.0 - similarities.mean(axis=1)).astype(np.float32)
        # faiss answers a NaN query with a huge finite distance; say "not a number" instead,
        # so the score is NaN and the verdict fails safe (anomalous) rather than looking real.
        distances[~np.isfinite(normalized).all(axis=1)] = np.nan
        return distances.reshape(shape)

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        faiss.write_index(self.index, str(directory / INDEX_FILE))
        if self.provenance is not None:
            self.provenance.save(directory)
        document = {**self.metadata, "bank": asdict(self.config)}
        return self.write_document(directory, document)

    @staticmethod
    def read_document(directory: str | Path) -> dict[str, Any]:
        """A saved bank's metadata (bank.json) without reading its index: what a change of
        the threshold alone needs."""
        return upgraded(json.loads((Path(directory) / METADATA_FILE).read_text()), directory)

    @staticmethod
    def write_document(directory: str | Path, document: dict[str, Any]) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        document = {**document, "format_version": FORMAT_VERSION}
        (directory / METADATA_FILE).write_text(json.dumps(document, indent=2) + "\n")
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> MemoryBank:
        directory = Path(directory)
        missing = [name for name in (INDEX_FILE, METADATA_FILE) if not (directory / name).exists()]
        if missing:
            raise FileNotFoundError(
                f"{directory} is not a saved memory bank (missing {', '.join(missing)}): "
                "fit one with `python -m detector fit`."
            )
        document = MemoryBank.read_document(directory)
        config = BankConfig(**document.pop("bank"))
        index = faiss.read_index(str(directory / INDEX_FILE))
        if config.index == "hnsw":
            index.hnsw.efSearch = config.hnsw_ef_search
        elif config.index == "ivf":
            ivf = faiss.extract_index_ivf(index)
            ivf.nprobe = min(config.ivf_nprobe, ivf.nlist)
        return cls(index, config, document, Provenance.load(directory))
