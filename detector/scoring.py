"""Patch distances -> image score, smoothed anomaly map, and a threshold from normal images only.

Defaults follow the published recipe: image score = mean of the top 1 % patch distances
(AnomalyDINO), map = bilinear upsampling + Gaussian blur with sigma 4 (PatchCore).
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from detector.drift import profile_to_list
from detector.provenance import NearestPatch


@dataclass
class ScoringConfig:
    image_score: str = "top_percent"  # top_percent | max
    top_percent: float = 1.0
    sigma: float = 4.0  # in pixels of the model input, before resizing to the original image
    false_alarm_rate: float = 0.01  # target share of normal images flagged at the threshold


# A promise measured on one capture session says nothing about the next one; two is the
# fewest that can show it holds across sessions (leave-one-session-out calibration).
SESSIONS_NEEDED = 2


def images_needed(target: float, confidence: float = 0.95) -> int:
    """Defect-free images that, with none above the threshold, bound the false-alarm rate at
    `target` with `confidence` (one-sided Clopper-Pearson with no exceedance: the bound is
    1 - (1 - confidence)^(1/n)); 299 for 1 % at 95 %."""
    return int(np.ceil(np.log(1 - confidence) / np.log(1 - target)))


@dataclass
class Calibration:
    """Threshold set on held-out defect-free images; the scores stay as the drift reference."""

    threshold: float
    false_alarm_rate: float  # the target the rule aimed at
    reference_scores: list[float] = field(default_factory=list)
    # One patch-distance profile per calibration image: the drift monitor's reference.
    reference_profiles: list[list[float]] = field(default_factory=list)
    rule: str = "empirical_quantile"  # detector.thresholds.RULES; "explicit" when set by hand
    # Where the scores came from: held_out (a split of the training images), cross_fitted
    # (every training image, scored by a bank without it), session (a separate folder) or
    # reviewed_records (the line's own defect-free records, from a threshold suggestion).
    source: str = "held_out"
    # Rows added to the bank since these scores were measured (reviewed false alarms added
    # without calibration images). Added rows only bring patches nearer the bank, so each
    # score can only have fallen: the rates stated from these scores are upper bounds.
    rows_added_since: int = 0
    # Capture sessions (a shift, a day, a camera setting) the fit saw, a calibration folder
    # counted as one: with one, the promise holds only for parts exchangeable with the
    # training images, as random folds of one session say nothing about the next. None: not
    # known (the line's own records, images a caller held out).
    sessions: int | None = None
    # The named sessions whose scores came from a bank without them (detector.sessions);
    # new scores bring their own, so a recalibration never keeps names of scores it dropped.
    session_names: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, document: dict[str, Any]) -> Calibration:
        """A stored calibration: the fields it has (banks saved before the rule and source
        were kept get the defaults); other keys, such as an estimate, are not fields."""
        names = cls.__dataclass_fields__
        fields = {key: value for key, value in document.items() if key in names}
        if "sessions" not in fields:  # saved before sessions were counted
            fields["sessions"] = {"session": 2, "reviewed_records": None}.get(
                str(fields.get("source", "held_out")), 1
            )
        return cls(**fields)

    def estimate(self, confidence: float = 0.95) -> dict[str, Any]:
        """What the calibration scores can say about the false-alarm rate at this threshold.

        With k of n held-out defect-free scores above the threshold, a new defect-free
        part from the same distribution is flagged with probability about (k + 1) / (n + 1)
        (exchangeable scores: the conformal estimate, whatever rule set the threshold), and
        the one-sided Clopper-Pearson bound says how high the rate may be: with k = 0 and
        n = 20 it is 14 %, so 20 images cannot show a 1 % rate.
        """
        from scipy.stats import beta

        scores = np.asarray(self.reference_scores, dtype=np.float64)
        n = int(scores.size)
        if n == 0:
            return {"calibration_images": 0, "expected_false_alarm_rate": None}
        above = int(np.count_nonzero(scores > self.threshold))
        upper = 1.0 if above >= n else float(beta.ppf(confidence, above + 1, n - above))
        lower = 0.0 if above == 0 else float(beta.ppf(1 - confidence, above, n - above + 1))
        expected = (above + 1) / (n + 1)
        needed = images_needed(self.false_alarm_rate, confidence)
        return {
            "calibration_images": n,
            "above_threshold": above,
            "target_false_alarm_rate": self.false_alarm_rate,
            "expected_false_alarm_rate": round(expected, 6),
            "lower_bound": round(lower, 6),  # one-sided bounds at `confidence` each
            "upper_bound": round(upper, 6),
            "confidence": confidence,
            "sessions": self.sessions,
            "across_sessions": self.across_sessions,
            "images_needed": needed,
            "sessions_needed": SESSIONS_NEEDED,
            "statement": (
                f"{above} of {n} {self.scored_parts} score above the threshold: about "
                f"{expected:.1%} of defect-free parts will be flagged, and with "
                f"{confidence:.0%} confidence at most {upper:.1%}"
                + (
                    f" ({n} images cannot show a rate below {upper:.0%})"
                    if above == 0 and upper > self.false_alarm_rate
                    else ""
                )
                + "."
                + self.session_caveat
                + (
                    self.sample_size_advice(n, needed, confidence)
                    if upper > self.false_alarm_rate
                    else ""
                )
                + self.staleness
            ),
            "rows_added_since": self.rows_added_since,
        }

    @property
    def staleness(self) -> str:
        """What the statement adds when the bank has grown since the scores were measured."""
        if not self.rows_added_since:
            return ""
        return (
            f" These scores were measured before {self.rows_added_since} rows were added "
            "to the bank; added rows only lower scores, so both rates are upper bounds "
            "until the product is recalibrated (calibration images, a later session's "
            "images, or the threshold from reviews)."
        )

    @property
    def across_sessions(self) -> bool | None:
        """Whether the scores come from parts of a session their bank did not see: False for
        random held-out images or random folds of the training sessions, None if unknown."""
        if self.source in ("leave_one_session_out", "session"):
            return True
        if self.source == "held_out" and self.sessions is not None:
            return False
        if self.source == "cross_fitted" and self.sessions == 1:
            return False
        return None

    @property
    def session_caveat(self) -> str:
        """What the statement adds when the scores come from the training images' sessions."""
        if self.across_sessions is not False:
            return ""
        if self.sessions == 1:
            return (
                " This holds for parts like the training images (one capture session): fit "
                "with a second session's images (train/good/<session>/) for a promise that "
                "holds across sessions."
            )
        return (
            f" This holds for parts like the training images (held out at random from their "
            f"{self.sessions} sessions): calibrate with folds (calibration_folds >= 2) to "
            "leave one session out, a promise that holds across sessions."
        )

    def sample_size_advice(self, images: int, needed: int, confidence: float) -> str:
        """How far the product is from a bound that can show the target rate."""
        if self.sessions is None:
            sessions = "an unknown number of sessions"
        else:
            sessions = f"{self.sessions} session" + ("s" if self.sessions != 1 else "")
        return (
            f" A {confidence:.0%} bound at the {self.false_alarm_rate:.1%} target needs about "
            f"{needed} defect-free images with none above the threshold, from at least "
            f"{SESSIONS_NEEDED} sessions; this product has {images}, and its fit saw "
            f"{sessions}."
        )

    @property
    def scored_parts(self) -> str:
        """What the calibration scores are of, as the statement names them."""
        if self.source == "reviewed_records":
            return "defect-free records (reviewed false alarms and parts not flagged)"
        if self.source == "leave_one_session_out":
            return (
                "defect-free images, each scored by a bank that had not seen its session "
                f"({self.sessions} sessions in all),"
            )
        return "held-out defect-free images"

    @property
    def promised_rate(self) -> float | None:
        """The false-alarm rate the drift monitor holds traffic to (see `estimate`)."""
        return self.estimate()["expected_false_alarm_rate"]


@dataclass
class InspectionResult:
    score: float
    threshold: float
    normalized_score: float
    is_anomalous: bool
    image_size: tuple[int, int]  # (width, height) of the original image
    anomaly_map: np.ndarray | None = None  # (height, width) float32 at the original size
    drift_profile: np.ndarray | None = None  # patch-distance quantiles, see drift_statistics
    nearest: NearestPatch | None = None  # the most anomalous cell's nearest bank row

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
    import torch  # here, so that what reads a calibration (the API process) never loads torch
    import torch.nn.functional as F

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
        from scipy.ndimage import gaussian_filter1d  # where maps are made: not the API's

        operator = gaussian_filter1d(operator, sigma, axis=0, truncate=4.0, mode="reflect")
    return _resize(operator, output_size, cells)


def anomaly_map(
    patch_scores: np.ndarray, patch_size: int, image_size: tuple[int, int], sigma: float
) -> np.ndarray:
    """A (height, width) map for an image of `image_size` (width, height).

    The patch grid is upsampled to the model's input (`patch_size` px per cell: the input
    itself, or a tiled frame's whole grid) and blurred there, which keeps sigma's meaning
    the same whatever the camera's resolution, then stretched to the original image.
    """
    grid = np.asarray(patch_scores, dtype=np.float32)
    width, height = image_size
    rows = _map_operator(grid.shape[0], grid.shape[0] * patch_size, height, float(sigma))
    columns = _map_operator(grid.shape[1], grid.shape[1] * patch_size, width, float(sigma))
    return rows @ grid @ columns.T


def calibrate(
    normal_scores: np.ndarray | list[float],
    false_alarm_rate: float,
    profiles: list[np.ndarray] | None = None,
    rule: str = "empirical_quantile",
    source: str = "held_out",
    sessions: int | None = None,
    session_names: list[str] | None = None,
) -> Calibration:
    """The threshold `rule` (detector.thresholds) sets for the target `false_alarm_rate` on
    defect-free scores; the images' patch-distance `profiles` are kept as the drift
    reference. The default rule is the (1 - rate) quantile rounded up to a real score: with
    fewer than 1 / rate images, the highest score.
    """
    from detector.thresholds import check_target, rule_named

    scores = np.asarray(normal_scores, dtype=np.float64)
    if scores.size == 0:
        raise ValueError("calibration needs at least one defect-free image")
    check_target(false_alarm_rate)
    threshold = check_threshold(rule_named(rule).threshold(scores, false_alarm_rate))
    reference = [profile_to_list(profile) for profile in profiles or []]
    return Calibration(
        threshold,
        false_alarm_rate,
        [float(s) for s in scores],
        reference,
        rule,
        source,
        sessions=sessions,
        session_names=list(session_names or []),
    )


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
