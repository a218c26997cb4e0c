"""The one scoring path: the service, the batch job and the evaluator all call AnomalyDetector.

Preprocessing lives in the extractor, distances in the memory bank, aggregation, maps and
thresholds in `scoring`; this class only wires them, so the same image gets the same score
wherever it is inspected.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import asdict
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from detector.backbone import DinoBackbone, FeatureExtractor
from detector.drift_statistics import patch_profile
from detector.images import read_image
from detector.memory_bank import BankConfig, MemoryBank
from detector.scoring import (
    Calibration,
    InspectionResult,
    ScoringConfig,
    anomaly_map,
    calibrate,
    image_score,
    make_result,
)

ImageSource = Image.Image | str | Path
# Keys of an extractor spec that must match between the bank and the backbone serving it.
SPEC_KEYS_THAT_MUST_MATCH = ("fingerprint", "layers", "resolution", "patch_size", "feature_dim")


class IncompatibleBankError(ValueError):
    """The memory bank was fitted with another backbone, resolution or layer set."""


def as_image(source: ImageSource) -> Image.Image:
    return source if isinstance(source, Image.Image) else read_image(source)


def check_compatible(bank_spec: dict[str, Any], extractor_spec: dict[str, Any]) -> None:
    differences = [
        f"{key} {bank_spec.get(key)!r} vs {extractor_spec.get(key)!r}"
        for key in SPEC_KEYS_THAT_MUST_MATCH
        if key in bank_spec and key in extractor_spec and bank_spec[key] != extractor_spec[key]
    ]
    if differences:
        raise IncompatibleBankError(
            f"The memory bank was fitted with backbone '{bank_spec.get('backbone')}' and cannot "
            f"be used with '{extractor_spec.get('backbone')}' ({'; '.join(differences)}): refit "
            "the bank with this backbone or serve it with the backbone it was fitted with."
        )


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
        check_compatible(bank.metadata.get("extractor", {}), extractor.spec)

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
            for start in range(0, len(images), batch_size):
                chunk = images[start : start + batch_size]
                batch = np.stack([extractor.prepare(as_image(source)) for source in chunk])
                yield extractor.embed(batch)
                bar.update(len(chunk))

    # ----- fitting --------------------------------------------------------------------
    @classmethod
    def fit(
        cls,
        extractor: FeatureExtractor,
        train_images: Sequence[ImageSource],
        calibration_images: Sequence[ImageSource],
        *,
        bank_config: BankConfig | None = None,
        scoring: ScoringConfig | None = None,
        batch_size: int = 8,
        progress: bool = True,
    ) -> AnomalyDetector:
        """Build the bank from defect-free images, then set the threshold on held-out ones."""
        if not train_images:
            raise ValueError("fitting needs at least one defect-free training image")
        if not calibration_images:
            raise ValueError("calibration needs at least one held-out defect-free image")
        batches = cls.iter_features(extractor, train_images, batch_size, progress, "fit features")
        first = next(batches)
        rows_per_image = int(np.prod(first.shape[1:-1]))
        bank = MemoryBank.fit_stream(
            chain([first], batches), rows_per_image * len(train_images), bank_config, progress
        )
        bank.metadata["extractor"] = dict(extractor.spec)
        bank.metadata["n_train_images"] = len(train_images)
        placeholder = Calibration(threshold=float("inf"), false_alarm_rate=0.0)
        detector = cls(extractor, bank, placeholder, scoring, batch_size)
        normal = detector.predict(calibration_images, with_maps=False)
        detector.calibration = calibrate(
            [r.score for r in normal],
            detector.scoring.false_alarm_rate,
            [r.drift_profile for r in normal],
        )
        return detector

    # ----- prediction -----------------------------------------------------------------
    def score_features(
        self, features: np.ndarray, image_sizes: Sequence[tuple[int, int]], with_maps: bool = True
    ) -> list[InspectionResult]:
        """Score a (B, h, w, D) feature batch; `image_sizes` are the originals' (width, height)."""
        distances = self.bank.distances(features)
        input_size = int(self.extractor.spec["resolution"])
        results = []
        for grid, size in zip(distances, image_sizes, strict=True):
            heatmap = anomaly_map(grid, input_size, size, self.scoring.sigma) if with_maps else None
            score = image_score(grid, self.scoring)
            results.append(make_result(score, self.calibration, size, heatmap, patch_profile(grid)))
        return results

    def predict_prepared(
        self,
        prepared: np.ndarray,
        image_sizes: Sequence[tuple[int, int]],
        with_maps: bool = True,
    ) -> list[InspectionResult]:
        """Score already-preprocessed (B, 3, H, W) arrays, for loaders that prepare in parallel."""
        results: list[InspectionResult] = []
        for start in range(0, len(prepared), self.batch_size):
            stop = start + self.batch_size
            features = self.extractor.embed(prepared[start:stop])
            results.extend(self.score_features(features, image_sizes[start:stop], with_maps))
        return results

    def prepare(self, image: ImageSource) -> tuple[np.ndarray, tuple[int, int]]:
        loaded = as_image(image)
        return self.extractor.prepare(loaded), loaded.size

    def predict(
        self, images: Sequence[ImageSource], with_maps: bool = True, progress: bool = False
    ) -> list[InspectionResult]:
        results: list[InspectionResult] = []
        with tqdm(total=len(images), desc="predict", unit="img", disable=not progress) as bar:
            for start in range(0, len(images), self.batch_size):
                prepared = [
                    self.prepare(image) for image in images[start : start + self.batch_size]
                ]
                batch = np.stack([array for array, _ in prepared])
                sizes = [size for _, size in prepared]
                results.extend(self.predict_prepared(batch, sizes, with_maps))
                bar.update(len(prepared))
        return results

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
        spec = bank.metadata.get("extractor", {})
        if extractor is None:
            extractor = DinoBackbone(
                spec["backbone"],
                layers=spec["layers"],
                resolution=spec["resolution"],
                **backbone_options,
            )
        scoring = ScoringConfig(**bank.metadata.get("scoring", {}))
        calibration = Calibration(**bank.metadata["calibration"])
        return cls(extractor, bank, calibration, scoring, batch_size)
