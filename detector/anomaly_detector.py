"""The one scoring path: the service, the batch job and the evaluator all call AnomalyDetector.

Preprocessing lives in the extractor, distances in the memory bank, aggregation, maps and
thresholds in `scoring`; this class only wires them, so the same image gets the same score
wherever it is inspected.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from PIL import Image
from tqdm import tqdm

from detector.drift import patch_profile
from detector.extractor import BackboneSpec, FeatureExtractor
from detector.images import read_image
from detector.masks import MASK_KEY
from detector.masks import from_document as mask_from_document
from detector.memory_bank import MemoryBank
from detector.provenance import NearestPatch, explanation, input_pixels
from detector.scoring import (
    Calibration,
    InspectionResult,
    ScoringConfig,
    anomaly_map,
    calibrate,
    check_threshold,
    image_score,
    make_result,
)
from detector.thresholds import rule_for_new_scores
from detector.tiling import TiledExtractor, Tiling, tiling_of, with_tiling

ImageSource = Image.Image | str | Path
Item = TypeVar("Item")
log = logging.getLogger(__name__)


def as_image(source: ImageSource) -> Image.Image:
    return source if isinstance(source, Image.Image) else read_image(source)


def capped_size(size: tuple[int, int], max_side: int | None) -> tuple[int, int]:
    """(width, height) scaled down to at most `max_side` on the long side, aspect kept."""
    width, height = size
    if not max_side or max(width, height) <= max_side:
        return width, height
    scale = max_side / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def batched(items: Sequence[Item], size: int) -> Iterator[Sequence[Item]]:
    """Consecutive slices of at most `size` items (itertools.batched needs Python 3.12)."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


def prepared_batches(
    extractor: FeatureExtractor, sources: Sequence[ImageSource], batch_size: int
) -> Iterator[tuple[list[Image.Image], np.ndarray]]:
    """(decoded images, (B, 3, H, W) input) per batch; images are decoded lazily, one batch
    at a time, so memory stays bounded whatever the number of images."""
    for chunk in batched(sources, batch_size):
        images = [as_image(source) for source in chunk]
        yield images, np.stack([extractor.prepare(image) for image in images])


def iter_features(
    extractor: FeatureExtractor,
    images: Sequence[ImageSource],
    batch_size: int,
    progress: bool = False,
    desc: str = "features",
) -> Iterator[np.ndarray]:
    """Yield (B, h, w, D) feature batches, decoding images lazily to bound memory."""
    with tqdm(total=len(images), desc=desc, unit="img", disable=not progress) as bar:
        for decoded, batch in prepared_batches(extractor, images, batch_size):
            yield extractor.embed(batch)
            bar.update(len(decoded))


class AnomalyDetector:
    """Feature extractor + memory bank + calibrated scoring, saved and loaded as one folder."""

    def __init__(
        self,
        extractor: FeatureExtractor,
        bank: MemoryBank,
        calibration: Calibration,
        scoring: ScoringConfig | None = None,
        batch_size: int = 8,
    ) -> None:
        # A tiled product's extractor runs on its tiles (detector.tiling), wherever it scores.
        self.extractor = with_tiling(extractor, Tiling.from_metadata(bank.metadata))
        self.bank = bank
        # Cells of the grid that are inspected (detector.masks); None: all of them.
        self.inspected = mask_from_document(bank.metadata)
        self.calibration = calibration
        self.scoring = scoring or ScoringConfig()
        self.batch_size = max(1, int(batch_size))
        self.bank_spec.check_compatible(extractor.spec)

    @property
    def bank_spec(self) -> BackboneSpec:
        """The backbone the bank was fitted with (the extractor's own spec before saving)."""
        stored = self.bank.metadata.get("extractor")
        return BackboneSpec.from_dict(stored) if stored else self.extractor.spec

    def settings_hash(self, **context: str) -> str:
        """16 hex digits naming everything but the bank's rows that decides a score: the
        backbone's weights and input, the scoring rule, the threshold, and `context` (the
        runtime and precision that ran the backbone). A record keeps it, so a replay with
        other settings is told so rather than reported as a changed decision."""
        document = {
            "extractor": self.extractor.spec.to_dict(),
            "scoring": asdict(self.scoring),
            "threshold": self.calibration.threshold,
            **context,
            # A product's own int8 graph says so itself, whatever runtime serves the rest.
            **getattr(self.extractor, "hash_context", {}),
        }
        if tiling := tiling_of(self.extractor):  # untiled products keep their hashes
            document["tiling"] = tiling.to_dict()
        if self.inspected is not None:  # unmasked products keep their hashes too
            document["inspect_mask"] = self.bank.metadata[MASK_KEY]["sha256"]
        encoded = json.dumps(document, sort_keys=True, default=str).encode()
        return hashlib.sha256(encoded).hexdigest()[:16]

    # ----- learning -------------------------------------------------------------------
    def embed_prepared(self, prepared: np.ndarray) -> np.ndarray:
        """(B, h, w, D) features of already-preprocessed images, `batch_size` at a time."""
        return np.concatenate(
            [self.extractor.embed(rows) for rows in batched(prepared, self.batch_size)]
        )

    def learned(
        self, features: np.ndarray, names: Sequence[str] | None = None
    ) -> tuple[AnomalyDetector, int]:
        """A detector whose bank also covers these defect-free features (of the images
        `names`), and how many rows that took; this one is untouched and keeps serving."""
        bank = self.bank.copy()
        added = bank.extend(features, names=names)
        calibration = replace(
            self.calibration, rows_added_since=self.calibration.rows_added_since + added
        )
        learned = AnomalyDetector(self.extractor, bank, calibration, self.scoring, self.batch_size)
        return learned, added

    def recalibrated(self, images: Sequence[ImageSource]) -> AnomalyDetector:
        """The same bank with threshold and drift reference set on these held-out images."""
        return self.calibrated_on(self.predict(images, with_maps=False))

    def calibrated_on(self, normal: Sequence[InspectionResult]) -> AnomalyDetector:
        """The same bank with threshold and drift reference set on held-out results (of
        this bank: what `predict` or `predict_prepared` gave for defect-free images)."""
        calibration = calibrate(
            [r.score for r in normal],
            self.scoring.false_alarm_rate,
            [r.drift_profile for r in normal],
            rule_for_new_scores(self.calibration.rule),  # new images set a hand-set one anew
            sessions=None,  # images the caller held out: their sessions are not known here
        )
        return AnomalyDetector(
            self.extractor, self.bank, calibration, self.scoring, self.batch_size
        )

    # ----- prediction -----------------------------------------------------------------
    def score_features(
        self,
        features: np.ndarray,
        image_sizes: Sequence[tuple[int, int]],
        with_maps: bool = True,
        map_max_side: int | None = None,
    ) -> list[InspectionResult]:
        """Score a (B, h, w, D) feature batch; `image_sizes` are the originals' (width, height).

        Maps are made at the image's size, or with `map_max_side` no longer than that on
        their long side (a 40 MP frame's full-size float map is 160 MB).
        """
        distances = self.bank.distances(features)
        patch = self.extractor.spec.patch_size
        results = []
        for grid, size, image_features in zip(distances, image_sizes, features, strict=True):
            # The drift profile keeps every cell, as its reference was measured; the score
            # and the map leave ignored cells out (they read 0 there).
            profile, raw = patch_profile(grid), grid
            inspected = grid if self.inspected is None else grid[self.inspected]
            if self.inspected is not None:
                grid = np.where(self.inspected, grid, 0.0)
            out = capped_size(size, map_max_side)
            heatmap = anomaly_map(grid, patch, out, self.scoring.sigma) if with_maps else None
            score = image_score(inspected, self.scoring)
            result = make_result(score, self.calibration, size, heatmap, profile)
            result.nearest = self.nearest_patch(raw, image_features)
            results.append(result)
        return results

    def nearest_patch(self, grid: np.ndarray, features: np.ndarray) -> NearestPatch | None:
        """The most anomalous inspected cell of one image's (h, w) distances and the bank
        row nearest to its feature: what an explanation shows (None when no inspected cell
        has a distance). One search of one row: nothing next to the whole grid's."""
        inspected = np.isfinite(grid) & (True if self.inspected is None else self.inspected)
        if not inspected.any():
            return None
        cell = np.unravel_index(int(np.argmax(np.where(inspected, grid, -np.inf))), grid.shape)
        row, distance = self.bank.nearest(features[cell])
        shape = (int(grid.shape[0]), int(grid.shape[1]))
        return NearestPatch((int(cell[0]), int(cell[1])), shape, distance, row)

    def explain(self, result: InspectionResult, prepared: np.ndarray) -> dict[str, Any]:
        """Why `result` (of the image `prepared` for this detector) scored as it did: its
        most anomalous region beside the nearest normal patch of the bank, with crops, or
        why that cannot be shown (detector.provenance)."""
        try:
            return self._explain(result, prepared)
        except Exception as error:  # noqa: BLE001 - an explanation never fails a scoring
            log.exception("the explanation of an image failed")
            return {"available": False, "why": f"the explanation failed ({type(error).__name__})"}

    def _explain(self, result: InspectionResult, prepared: np.ndarray) -> dict[str, Any]:
        provenance = self.bank.provenance
        known = provenance is not None and result.nearest is not None
        said = explanation(
            result.nearest,
            provenance,
            input_pixels(prepared),
            result.image_size,
            self.bank.covering_radius if known else 0.0,
        )
        if said["available"] and isinstance(self.extractor, TiledExtractor):  # which tile
            said["flagged"]["tile"] = self.extractor.tile_of(said["flagged"]["cell"])
            normal = said["nearest_normal"]
            normal["tile"] = self.extractor.tile_of(normal["cell"]) if normal["cell"] else None
        return said

    def predict_prepared(
        self,
        prepared: np.ndarray,
        image_sizes: Sequence[tuple[int, int]],
        with_maps: bool = True,
        map_max_side: int | None = None,
    ) -> list[InspectionResult]:
        """Score already-preprocessed (B, 3, H, W) arrays, for loaders that prepare in parallel."""
        results: list[InspectionResult] = []
        size = self.batch_size
        for rows, sizes in zip(batched(prepared, size), batched(image_sizes, size), strict=True):
            features = self.extractor.embed(rows)
            results.extend(self.score_features(features, sizes, with_maps, map_max_side))
        return results

    def prepare(self, image: ImageSource) -> tuple[np.ndarray, tuple[int, int]]:
        loaded = as_image(image)
        return self.extractor.prepare(loaded), loaded.size

    def iter_predict(
        self, images: Sequence[ImageSource], with_maps: bool = True, progress: bool = False
    ) -> Iterator[tuple[Image.Image, InspectionResult]]:
        """(decoded image, result) pairs, one batch decoded at a time: for callers that need
        the pixels too (evaluation thumbnails) without holding every image."""
        with tqdm(total=len(images), desc="predict", unit="img", disable=not progress) as bar:
            for decoded, batch in prepared_batches(self.extractor, images, self.batch_size):
                sizes = [image.size for image in decoded]
                yield from zip(decoded, self.predict_prepared(batch, sizes, with_maps), strict=True)
                bar.update(len(decoded))

    def predict(
        self, images: Sequence[ImageSource], with_maps: bool = True, progress: bool = False
    ) -> list[InspectionResult]:
        return [result for _, result in self.iter_predict(images, with_maps, progress)]

    # ----- persistence ----------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        self.bank.metadata["scoring"] = asdict(self.scoring)
        self.bank.metadata["calibration"] = self.calibration.to_dict()
        return self.bank.save(directory)

    @classmethod
    def load(
        cls,
        directory: str | Path,
        extractor: FeatureExtractor | None = None,
        batch_size: int = 8,
        **backbone_options: Any,
    ) -> AnomalyDetector:
        """Load a saved detector; without `extractor` the backbone named in the bank is loaded."""
        return cls.from_bank(MemoryBank.load(directory), extractor, batch_size, **backbone_options)

    @classmethod
    def from_bank(
        cls,
        bank: MemoryBank,
        extractor: FeatureExtractor | None = None,
        batch_size: int = 8,
        **backbone_options: Any,
    ) -> AnomalyDetector:
        """Without `extractor`, the backbone the bank was fitted with is built from its spec
        (`backbone_options`: `source` to load it from elsewhere, device, precision, threads)."""
        if extractor is None:
            from detector.backbone import extractor_for

            spec = BackboneSpec.from_dict(bank.metadata["extractor"])
            extractor = extractor_for(spec, **backbone_options)
        scoring = ScoringConfig(**bank.metadata.get("scoring", {}))
        calibration = Calibration.from_dict(bank.metadata["calibration"])
        check_threshold(calibration.threshold)
        return cls(extractor, bank, calibration, scoring, batch_size)
