"""Patch distances -> image score, smoothed anomaly map, and a threshold from normal images only.

Defaults follow the published recipe: image score = mean of the top 1 % patch distances
(AnomalyDINO), map = bilinear upsampling + Gaussian blur with sigma 4 (PatchCore).
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter1d

from detector.drift import profile_to_list


@dataclass
class ScoringConfig:
    image_score: str = "top_percent"  # top_percent | max
    top_percent: float = 1.0
    sigma: float = 4.0  # in pixels of the model input, before resizing to the original image
    false_alarm_rate: float = 0.01  # target share of normal images flagged at the threshold


@dataclass
class Calibration:
    """Threshold set on held-out defect-free images; the scores stay as the drift reference."""

    threshold: float
    false_alarm_rate: float
    reference_scores: list[float] = field(default_factory=list)
    # One patch-distance profile per calibration image: the drift monitor's reference.
    reference_profiles: list[list[float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class InspectionResult:
    score: float
    threshold: float
    normalized_score: float
    is_anomalous: bool
    image_size: tuple[int, int]  # (width, height) of the original image
    anomaly_map: np.ndarray | None = None  # (height, width) float32 at the original size
    drift_profile: np.ndarray | None = None  # patch-distance quantiles, see drift_statistics

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe: a score that is not a finite number (NaN features) becomes null, never
        `NaN` (which strict JSON parsers refuse); the verdict is then anomalous."""
        return {
            "score": finite_or_none(self.score),
            "threshold": self.threshold,
            "normalized_score": finite_or_none(self.normalized_score),
            "is_anomalous": self.is_anomalous,
            "image_width": self.image_size[0],
            "image_height": self.image_size[1],
        }


def finite_or_none(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None


def check_threshold(threshold: float) -> float:
    """A usable threshold is a finite number above 0; anything else would flag every part
    (or none) without saying so."""
    if not (np.isfinite(threshold) and threshold > 0):
        raise ValueError(
            f"The calibrated threshold is {threshold}, not a finite number above 0: the "
            "calibration images score 0 (they duplicate bank images) or not at all; "
            "calibrate on other defect-free images."
        )
    return float(threshold)


def image_score(patch_scores: np.ndarray, config: ScoringConfig) -> float:
    """Aggregate a (h, w) patch-distance grid; top-k mean is robust to one noisy patch."""
    values = np.asarray(patch_scores, dtype=np.float64).ravel()
    if config.image_score == "max":
        return float(values.max())
    if config.image_score != "top_percent":
        raise ValueError(f"unknown image_score {config.image_score!r}: use top_percent or max")
    count = max(1, int(np.ceil(values.size * config.top_percent / 100.0)))
    return float(np.partition(values, values.size - count)[-count:].mean())


def _resize(grid: np.ndarray, height: int, width: int) -> np.ndarray:
    tensor = torch.from_numpy(np.ascontiguousarray(grid, dtype=np.float32))[None, None]
    resized = F.interpolate(tensor, size=(height, width), mode="bilinear", align_corners=False)
    return resized[0, 0].numpy()


@functools.lru_cache(maxsize=64)
def _map_operator(cells: int, input_size: int, output_size: int, sigma: float) -> np.ndarray:
    """(output_size, cells) matrix = resize-to-output . blur . upsample-to-input, along one axis.

    Bilinear resizing and Gaussian blurring are both separable and linear, so the whole map
    is `rows @ grid @ columns.T`: the same numbers as upsampling, blurring and resizing the
    image-sized map step by step, for a fraction of the time (this runs once per image).
    """
    operator = _resize(np.eye(cells, dtype=np.float32), input_size, cells)
    if sigma > 0:
        operator = gaussian_filter1d(operator, sigma, axis=0, truncate=4.0, mode="reflect")
    return _resize(operator, output_size, cells)


def anomaly_map(
    patch_scores: np.ndarray, input_size: int, image_size: tuple[int, int], sigma: float
) -> np.ndarray:
    """A (height, width) map for an image of `image_size` (width, height).

    The patch grid is upsampled to the model's input resolution and blurred there, which
    keeps sigma's meaning the same whatever the camera's resolution, then stretched to the
    original image.
    """
    grid = np.asarray(patch_scores, dtype=np.float32)
    width, height = image_size
    rows = _map_operator(grid.shape[0], input_size, height, float(sigma))
    columns = _map_operator(grid.shape[1], input_size, width, float(sigma))
    return rows @ grid @ columns.T


def calibrate(
    normal_scores: np.ndarray | list[float],
    false_alarm_rate: float,
    profiles: list[np.ndarray] | None = None,
) -> Calibration:
    """Threshold = the (1 - rate) quantile of defect-free scores, rounded up to a real score.

    With fewer than 1 / rate calibration images this is the highest normal score, the
    tightest threshold that flags none of them. The images' patch-distance `profiles` are
    kept as the drift reference.
    """
    scores = np.asarray(normal_scores, dtype=np.float64)
    if scores.size == 0:
        raise ValueError("calibration needs at least one defect-free image")
    if not 0 <= false_alarm_rate < 1:
        raise ValueError(f"false_alarm_rate must be in [0, 1), got {false_alarm_rate}")
    threshold = check_threshold(float(np.quantile(scores, 1.0 - false_alarm_rate, method="higher")))
    reference = [profile_to_list(profile) for profile in profiles or []]
    return Calibration(threshold, false_alarm_rate, [float(s) for s in scores], reference)


def make_result(
    score: float,
    calibration: Calibration,
    image_size: tuple[int, int],
    anomaly_map_: np.ndarray | None = None,
    drift_profile: np.ndarray | None = None,
) -> InspectionResult:
    threshold = calibration.threshold
    normalized = score / threshold if threshold > 0 else float("inf")
    return InspectionResult(
        score=float(score),
        threshold=float(threshold),
        normalized_score=float(normalized),
        # Fail safe: a score that is not a number is not "below the threshold".
        is_anomalous=not bool(score <= threshold),
        image_size=(int(image_size[0]), int(image_size[1])),
        anomaly_map=anomaly_map_,
        drift_profile=drift_profile,
    )
