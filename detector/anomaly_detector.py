"""The one scoring path: the service, the batch job and the evaluator all call AnomalyDetector.

Preprocessing lives in the extractor, distances in the memory bank, aggregation, maps and
thresholds in `scoring`; this class only wires them, so the same image gets the same score
wherever it is inspected.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict, replace
from itertools import chain
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from PIL import Image
from tqdm import tqdm

from detector.backbone import BackboneSpec, FeatureExtractor
from detector.drift import patch_profile
from detector.images import read_image
from detector.memory_bank import BankConfig, MemoryBank
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

ImageSource = Image.Image | str | Path
Item = TypeVar("Item")


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


def assign_folds(count: int, folds: int, groups: Sequence[int] | None, seed: int) -> np.ndarray:
    """The fold of each of `count` items: groups shuffled by `seed`, dealt round-robin."""
    group_of = np.asarray(groups if groups is not None else range(count))
    if group_of.shape != (count,):
        raise ValueError("groups must name one group per training image")
    distinct = np.unique(group_of)
    if folds < 2 or distinct.size < folds:
        raise ValueError(
            f"Cross-fitted calibration with {folds} folds needs at least {max(folds, 2)} "
            f"distinct training images ({distinct.size} given): set calibration.folds, or "
            "calibrate on separate images (data.calibration_dir)."
        )
    order = np.random.default_rng(seed).permutation(distinct)
    fold_of_group = {group: position % folds for position, group in enumerate(order)}
    return np.array([fold_of_group[group] for group in group_of])


class FeatureSpill:
    """Every training image's (h, w, D) features, kept once for the bank and every fold:
    in memory up to `in_memory_bytes`, beyond that in a temporary file (numpy memmap)."""

    def __init__(self, in_memory_bytes: int = 512 << 20) -> None:
        self.in_memory_bytes = in_memory_bytes
        self._parts: list[np.ndarray] = []
        self._held = 0
        self._folder: tempfile.TemporaryDirectory | None = None

    def __enter__(self) -> FeatureSpill:
        return self

    def __exit__(self, *exc: object) -> None:
        self._parts.clear()
        if self._folder is not None:
            self._folder.cleanup()

    def append(self, batch: np.ndarray) -> None:
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        self._held += batch.nbytes
        if self._held > self.in_memory_bytes:
            if self._folder is None:
                self._folder = tempfile.TemporaryDirectory(prefix="fit-features-")
            path = Path(self._folder.name) / f"{len(self._parts)}.npy"
            np.save(path, batch)
            batch = np.load(path, mmap_mode="r")
        self._parts.append(batch)

    def _locate(self, index: int) -> tuple[np.ndarray, int]:
        for part in self._parts:
            if index < part.shape[0]:
                return part, index
            index -= part.shape[0]
        raise IndexError(index)

    def take(self, indices: Sequence[int]) -> np.ndarray:
        return np.stack([part[offset] for part, offset in map(self._locate, indices)])

    def rows(self, indices: Sequence[int]) -> int:
        part = self._parts[0]
        return len(indices) * int(np.prod(part.shape[1:-1]))

    def blocks(self, indices: Sequence[int], size: int) -> Iterator[np.ndarray]:
        for chunk in batched(list(indices), size):
            yield self.take(chunk)


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
        self.extractor = extractor
        self.bank = bank
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
        }
        encoded = json.dumps(document, sort_keys=True, default=str).encode()
        return hashlib.sha256(encoded).hexdigest()[:16]

    # ----- features -------------------------------------------------------------------
    @staticmethod
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

    # ----- fitting --------------------------------------------------------------------
    @classmethod
    def fit(
        cls,
        extractor: FeatureExtractor,
        train_images: Sequence[ImageSource],
        calibration_images: Sequence[ImageSource] | None = None,
        *,
        folds: int = 5,
        groups: Sequence[int] | None = None,
        rule: str = "empirical_quantile",
        calibration_source: str = "held_out",
        bank_config: BankConfig | None = None,
        scoring: ScoringConfig | None = None,
        batch_size: int = 8,
        progress: bool = True,
    ) -> AnomalyDetector:
        """Build the bank from defect-free images and set the threshold by `rule`.

        With `calibration_images` (held out, or a later session's), they set the threshold
        and the drift reference. Without, the fit is cross-fitted: the bank is built from
        every training image, and every training image also gets a held-out score from a
        bank built without its fold (`folds` folds; items of one `groups` value, such as the
        augmented copies of one photo, stay in one fold). Features are extracted once.
        """
        if not train_images:
            raise ValueError("fitting needs at least one defect-free training image")
        if calibration_images is not None and len(calibration_images) > 0:
            return cls._fit_and_calibrate(
                extractor,
                train_images,
                calibration_images,
                rule,
                calibration_source,
                bank_config,
                scoring,
                batch_size,
                progress,
            )
        return cls._cross_fit(
            extractor, train_images, folds, groups, rule, bank_config, scoring, batch_size, progress
        )

    @classmethod
    def _fit_and_calibrate(
        cls,
        extractor: FeatureExtractor,
        train_images: Sequence[ImageSource],
        calibration_images: Sequence[ImageSource],
        rule: str,
        source: str,
        bank_config: BankConfig | None,
        scoring: ScoringConfig | None,
        batch_size: int,
        progress: bool,
    ) -> AnomalyDetector:
        batches = cls.iter_features(extractor, train_images, batch_size, progress, "fit features")
        first = next(batches)
        rows_per_image = int(np.prod(first.shape[1:-1]))
        bank = MemoryBank.fit_stream(
            chain([first], batches), rows_per_image * len(train_images), bank_config, progress
        )
        detector = cls._uncalibrated(extractor, bank, len(train_images), scoring, batch_size)
        normal = detector.predict(calibration_images, with_maps=False)
        detector.calibration = calibrate(
            [r.score for r in normal],
            detector.scoring.false_alarm_rate,
            [r.drift_profile for r in normal],
            rule,
            source,
        )
        return detector

    @classmethod
    def _uncalibrated(
        cls,
        extractor: FeatureExtractor,
        bank: MemoryBank,
        n_images: int,
        scoring: ScoringConfig | None,
        batch_size: int,
    ) -> AnomalyDetector:
        bank.metadata["extractor"] = extractor.spec.to_dict()
        bank.metadata["n_train_images"] = n_images
        placeholder = Calibration(threshold=float("inf"), false_alarm_rate=0.5)
        return cls(extractor, bank, placeholder, scoring, batch_size)

    @classmethod
    def _cross_fit(
        cls,
        extractor: FeatureExtractor,
        train_images: Sequence[ImageSource],
        folds: int,
        groups: Sequence[int] | None,
        rule: str,
        bank_config: BankConfig | None,
        scoring: ScoringConfig | None,
        batch_size: int,
        progress: bool,
    ) -> AnomalyDetector:
        config = bank_config or BankConfig()
        fold_of = assign_folds(len(train_images), folds, groups, config.seed)
        with FeatureSpill() as features:
            for batch in cls.iter_features(
                extractor, train_images, batch_size, progress, "fit features"
            ):
                features.append(batch)
            everything = np.arange(len(train_images))
            bank = MemoryBank.fit_stream(
                features.blocks(everything, batch_size), features.rows(everything), config, progress
            )
            detector = cls._uncalibrated(extractor, bank, len(train_images), scoring, batch_size)
            scores = np.empty(len(train_images))
            profiles: list[np.ndarray] = [np.empty(0)] * len(train_images)
            size = (extractor.spec.resolution, extractor.spec.resolution)
            for fold in range(folds):
                inside, held_out = np.flatnonzero(fold_of != fold), np.flatnonzero(fold_of == fold)
                fold_bank = MemoryBank.fit_stream(
                    features.blocks(inside, batch_size), features.rows(inside), config, False
                )
                scorer = cls(extractor, fold_bank, detector.calibration, scoring, batch_size)
                for chunk in batched(held_out, batch_size):
                    results = scorer.score_features(
                        features.take(chunk), [size] * len(chunk), with_maps=False
                    )
                    for index, result in zip(chunk, results, strict=True):
                        scores[index], profiles[index] = result.score, result.drift_profile
        detector.bank.metadata["calibration_folds"] = folds
        detector.calibration = calibrate(
            scores, detector.scoring.false_alarm_rate, profiles, rule, "cross_fitted"
        )
        return detector

    # ----- learning -------------------------------------------------------------------
    def embed_prepared(self, prepared: np.ndarray) -> np.ndarray:
        """(B, h, w, D) features of already-preprocessed images, `batch_size` at a time."""
        return np.concatenate(
            [self.extractor.embed(rows) for rows in batched(prepared, self.batch_size)]
        )

    def learned(self, features: np.ndarray) -> tuple[AnomalyDetector, int]:
        """A detector whose bank also covers these defect-free features, and how many rows
        that took; this one is untouched and keeps serving meanwhile."""
        bank = self.bank.copy()
        added = bank.extend(features)
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
            self.calibration.rule,
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
        input_size = self.extractor.spec.resolution
        results = []
        for grid, size in zip(distances, image_sizes, strict=True):
            out = capped_size(size, map_max_side)
            heatmap = anomaly_map(grid, input_size, out, self.scoring.sigma) if with_maps else None
            score = image_score(grid, self.scoring)
            results.append(make_result(score, self.calibration, size, heatmap, patch_profile(grid)))
        return results

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
            extractor = BackboneSpec.from_dict(bank.metadata["extractor"]).build(**backbone_options)
        scoring = ScoringConfig(**bank.metadata.get("scoring", {}))
        calibration = Calibration.from_dict(bank.metadata["calibration"])
        check_threshold(calibration.threshold)
        return cls(extractor, bank, calibration, scoring, batch_size)
