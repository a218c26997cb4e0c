"""Has the line drifted? Incoming images compared with the calibration images, without labels.

Every scored image leaves a *profile*: quantiles of its patch distances to the memory bank.
The monitor pools the profiles of a sliding window of recent images and compares them with
the profiles of the defect-free calibration images (stored with the bank) by the two-sample
Kolmogorov-Smirnov statistic.

- Patch distances, not image scores: an image score is the top 1 % of one image, so a
  calibration set of 30 images gives 30 numbers; its patches give thousands, and lighting,
  focus or camera changes move all of them.
- Only the lower 90 % of each image's patches: a defect is local and lives in the top
  quantiles, so a window with defective parts still looks like defect-free traffic, while a
  global change (exposure, blur, a moved camera) shifts the whole profile.
- The KS *statistic*, not its p-value: patches of one image are correlated, so p-values
  would claim certainty the data does not have. The statistic is a plain distance between
  distributions: 0 = the same, 1 = no overlap at all. Backbone-agnostic: it only sees
  distance grids.

The profiles leave out what the verdict looks at (the top patches), so a flood of flags can
come with a low statistic. The window's verdicts are therefore checked too: the share of
flagged images against the rate the calibration promised (plus the defect rate the line
expects), by a one-sided binomial test. Images are independent draws here, unlike patches,
so its p-value means what it says.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

PROFILE_QUANTILES = np.round(np.linspace(0.01, 0.90, 90), 2)


def patch_profile(patch_distances: np.ndarray) -> np.ndarray:
    """(90,) float32: the 1st..90th percentiles of one image's patch-distance grid."""
    values = np.asarray(patch_distances, dtype=np.float64).ravel()
    return np.quantile(values, PROFILE_QUANTILES).astype(np.float32)


def profile_to_list(profile: np.ndarray) -> list[float]:
    """JSON-ready profile: the shortest decimals that give back the same float32 values, so a
    statistic recomputed from a journal equals the one computed live. A profile that is not
    all finite (an image whose features were not numbers) is empty: it is no evidence of
    drift, and NaN is not JSON."""
    values = np.asarray(profile, dtype=np.float32)
    if not np.isfinite(values).all():
        return []
    return [float(str(value)) for value in values]


def drift_statistic(reference: np.ndarray, recent: np.ndarray) -> float:
    """KS distance between pooled reference profiles and pooled recent profiles, in [0, 1]."""
    from scipy.stats import ks_2samp  # ~1 s to import: only where a statistic is computed

    reference = np.asarray(reference, dtype=np.float64).ravel()
    recent = np.asarray(recent, dtype=np.float64).ravel()
    if reference.size == 0 or recent.size == 0:
        raise ValueError("drift needs reference profiles and at least one recent profile")
    # Only the distance is used, never the p-value: the exact p-value, which scipy computes
    # by default for windows under 10,000 values, took half of a small image's scoring time.
    return float(ks_2samp(reference, recent, method="asymp").statistic)


@dataclass(frozen=True)
class DriftSettings:
    window_size: int = 200  # images in the sliding window
    min_images: int = 20  # no statistic before this many: a handful of images is noise
    alert_level: float = 0.3  # statistic at which the status says "drifting" (docs/DRIFT.md)
    # The flagged share is "too high" when a binomial test against the promised rate gives
    # a p-value below this: at 0.001 a healthy line reads "drifting" about once in a
    # thousand full windows.
    flag_alpha: float = 0.001
    defect_rate: float = 0.0  # share of truly defective parts the line expects

    def __post_init__(self) -> None:
        if self.window_size < 1 or not 1 <= self.min_images <= self.window_size:
            raise ValueError("drift window needs window_size >= min_images >= 1")
        if not 0 < self.flag_alpha < 1 or not 0 <= self.defect_rate < 1:
            raise ValueError("flag_alpha must be in (0, 1) and defect_rate in [0, 1)")


def flag_rate_check(
    flags: list[bool], promised_rate: float | None, settings: DriftSettings
) -> dict[str, Any]:
    """The window's flagged share against `promised_rate` + the expected defect rate."""
    flagged = int(sum(bool(flag) for flag in flags))
    check: dict[str, Any] = {
        "flagged": flagged,
        "flag_rate": round(flagged / len(flags), 6) if flags else None,
        "expected_flag_rate": None,
        "flag_rate_p_value": None,
    }
    if promised_rate is None or len(flags) < settings.min_images:
        return check
    from scipy.stats import binomtest

    expected = min(1.0, promised_rate + settings.defect_rate)
    check["expected_flag_rate"] = round(expected, 6)
    if expected < 1.0:
        test = binomtest(flagged, len(flags), expected, alternative="greater")
        check["flag_rate_p_value"] = float(f"{test.pvalue:.6g}")
    return check


def drift_report(
    reference: np.ndarray,
    profiles: Iterable[np.ndarray],
    settings: DriftSettings,
    flags: Iterable[bool] | None = None,
    promised_rate: float | None = None,
) -> dict[str, Any]:
    """The statistic for a set of images (a batch run, a simulated shift), with context;
    with their verdicts (`flags`) and the calibration's promised false-alarm rate, also the
    flag-rate check. Status "drifting" names its `reasons`: patch_distances, flag_rate."""
    recent = [np.asarray(profile, dtype=np.float32) for profile in profiles]
    reference = np.asarray(reference, dtype=np.float32)
    report: dict[str, Any] = {
        "statistic": None,
        "images": len(recent),
        "reference_images": int(reference.shape[0]) if reference.size else 0,
        "min_images": settings.min_images,
        "alert_level": settings.alert_level,
    }
    if not report["reference_images"]:
        report["status"] = "no_reference"
    elif len(recent) < settings.min_images:
        report["status"] = "warming_up"
    else:
        statistic = drift_statistic(reference, np.stack(recent))
        report["statistic"] = round(statistic, 6)
        report["status"] = "drifting" if statistic >= settings.alert_level else "ok"
    reasons = ["patch_distances"] if report["status"] == "drifting" else []
    if flags is not None:
        report.update(flag_rate_check(list(flags), promised_rate, settings))
        p_value = report["flag_rate_p_value"]
        if p_value is not None and p_value < settings.flag_alpha:
            reasons.append("flag_rate")
            report["status"] = "drifting"
    report["reasons"] = reasons
    return report


class DriftMonitor:
    """A thread-safe sliding window of profiles and verdicts, for a service that scores
    concurrently; `promised_rate` is the calibration's false-alarm rate."""

    def __init__(
        self,
        reference: np.ndarray,
        settings: DriftSettings | None = None,
        promised_rate: float | None = None,
    ) -> None:
        self.reference = np.asarray(reference, dtype=np.float32).reshape(-1, PROFILE_QUANTILES.size)
        self.settings = settings or DriftSettings()
        self.promised_rate = promised_rate
        self._window: deque[np.ndarray] = deque(maxlen=self.settings.window_size)
        self._flags: deque[bool] = deque(maxlen=self.settings.window_size)
        self._lock = threading.Lock()

    def add(
        self, profiles: Iterable[np.ndarray], flags: Iterable[bool] | None = None
    ) -> dict[str, Any]:
        """Append profiles (and the images' verdicts) and return the status after them."""
        finite = (np.asarray(p, dtype=np.float32) for p in profiles)
        with self._lock:
            self._window.extend(p for p in finite if p.size and np.isfinite(p).all())
            if flags is not None:
                self._flags.extend(bool(flag) for flag in flags)
            return self._status()

    def status(self) -> dict[str, Any]:
        with self._lock:
            return self._status()

    def new_operating_point(self, promised_rate: float | None) -> None:
        """A new threshold on the same reference (a threshold-only version, a rollback to
        one): the promise changes, and verdicts made under the old threshold cannot test it,
        so the flag window starts afresh; the profiles, which the threshold does not touch,
        stay."""
        with self._lock:
            if promised_rate != self.promised_rate:
                self.promised_rate = promised_rate
                self._flags.clear()

    def _status(self) -> dict[str, Any]:
        report = drift_report(
            self.reference, list(self._window), self.settings, self._flags, self.promised_rate
        )
        report["window_size"] = self.settings.window_size
        report["promised_rate"] = self.promised_rate
        return report
