"""The drift statistic: low for the calibration distribution, high for a shifted one."""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from detector.anomaly_detector import AnomalyDetector
from detector.data.shifts import apply_shift
from detector.drift import (
    PROFILE_QUANTILES,
    DriftMonitor,
    DriftSettings,
    drift_report,
    drift_statistic,
    patch_profile,
)
from devtools.in_process import run_detector


def profiles(rng: np.random.Generator, count: int, offset: float = 0.0) -> np.ndarray:
    return np.stack([patch_profile(rng.gamma(4.0, 0.1, (16, 16)) + offset) for _ in range(count)])


def test_profile_is_the_lower_90_percent_of_the_grid() -> None:
    grid = np.arange(100, dtype=np.float32).reshape(10, 10)
    profile = patch_profile(grid)
    assert profile.shape == PROFILE_QUANTILES.shape
    assert profile[0] == pytest.approx(0.99) and profile[-1] == pytest.approx(89.1)
    grid[-1, -5:] = 1e6  # a local defect (the 5 highest patches) leaves the profile alone
    assert np.array_equal(patch_profile(grid), profile)


def test_statistic_is_small_for_the_same_distribution_and_one_for_no_overlap() -> None:
    rng = np.random.default_rng(0)
    reference = profiles(rng, 30)
    assert drift_statistic(reference, profiles(rng, 50)) < 0.1
    assert drift_statistic(reference, profiles(rng, 50, offset=10.0)) == 1.0
    assert 0.2 < drift_statistic(reference, profiles(rng, 50, offset=0.1)) < 1.0


def test_report_waits_for_enough_images_and_flags_drift() -> None:
    rng = np.random.default_rng(1)
    reference = profiles(rng, 30)
    settings = DriftSettings(window_size=50, min_images=10, alert_level=0.5)
    waiting = drift_report(reference, profiles(rng, 9), settings)
    assert waiting["status"] == "warming_up" and waiting["statistic"] is None
    assert drift_report(reference, profiles(rng, 10), settings)["status"] == "ok"
    shifted = drift_report(reference, profiles(rng, 10, offset=5.0), settings)
    assert shifted["status"] == "drifting" and shifted["statistic"] == 1.0
    assert drift_report(np.empty((0, 90)), profiles(rng, 10), settings)["status"] == "no_reference"
    json.dumps(shifted)  # what the service and the batch job write


def test_monitor_slides_its_window_back_to_normal() -> None:
    rng = np.random.default_rng(2)
    monitor = DriftMonitor(profiles(rng, 30), DriftSettings(window_size=20, min_images=5))
    assert monitor.add(profiles(rng, 20, offset=5.0))["status"] == "drifting"
    status = monitor.add(profiles(rng, 20))  # the shifted images have left the window
    assert status["status"] == "ok" and status["images"] == 20


def test_monitor_counts_every_image_from_concurrent_threads() -> None:
    rng = np.random.default_rng(3)
    monitor = DriftMonitor(profiles(rng, 10), DriftSettings(window_size=1000, min_images=1))
    batches = [profiles(rng, 5) for _ in range(40)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(monitor.add, batches))
    assert monitor.status()["images"] == 200


def test_settings_refuse_a_window_smaller_than_its_minimum() -> None:
    with pytest.raises(ValueError, match="window"):
        DriftSettings(window_size=5, min_images=10)


def test_fitted_detector_keeps_a_reference_and_sees_brightness_drift(
    fitted_detector: AnomalyDetector, synthetic_dataset
) -> None:
    reference = np.asarray(fitted_detector.calibration.reference_profiles)
    assert reference.shape == (6, PROFILE_QUANTILES.size)
    good = [s.path for s in synthetic_dataset.test_samples() if s.label == 0]
    images = [Image.open(path).convert("RGB") for path in good]
    settings = DriftSettings(min_images=len(images))

    def statistic(batch: list[Image.Image]) -> float:
        results = fitted_detector.predict(batch, with_maps=False)
        return drift_report(reference, [r.drift_profile for r in results], settings)["statistic"]

    clean = statistic(images)
    brighter = statistic([apply_shift(image, "brightness", 1.3) for image in images])
    assert clean < 0.35 and brighter > 0.8


def test_reference_can_be_replaced_by_chosen_images(
    saved_detector_dir: Path, synthetic_dataset, tmp_path: Path
) -> None:
    """After an accepted change (brighter lights), re-referencing makes that look normal."""
    model_dir = tmp_path / "model"
    shutil.copytree(saved_detector_dir, model_dir)
    accepted = tmp_path / "accepted"
    accepted.mkdir()
    for path in synthetic_dataset.train_paths()[:8]:
        with Image.open(path) as image:
            apply_shift(image, "brightness", 1.3).save(accepted / path.name)
    brighter = [
        apply_shift(Image.open(s.path).convert("RGB"), "brightness", 1.3)
        for s in synthetic_dataset.test_samples()
        if s.label == 0
    ]
    before = AnomalyDetector.load(model_dir)
    profiles = [r.drift_profile for r in before.predict(brighter, with_maps=False)]
    settings = DriftSettings(min_images=1)
    old = drift_report(np.asarray(before.calibration.reference_profiles), profiles, settings)

    result = run_detector(tmp_path, "set-drift-reference", str(model_dir), str(accepted))
    assert result.returncode == 0, result.stderr
    after = AnomalyDetector.load(model_dir)
    new = drift_report(np.asarray(after.calibration.reference_profiles), profiles, settings)
    assert len(after.calibration.reference_profiles) == 8
    assert after.calibration.threshold == before.calibration.threshold  # only the reference
    assert old["statistic"] > 0.8 and new["statistic"] < 0.35

    missing = run_detector(tmp_path, "set-drift-reference", str(model_dir), str(tmp_path / "no"))
    assert missing.returncode == 2
    assert missing.stderr.strip().startswith("error:") and "Traceback" not in missing.stderr


def test_a_flood_of_flags_reads_drifting_while_the_statistic_alone_stays_low() -> None:
    """The profiles leave out the top patches the verdict looks at: parts flagged for local
    marks keep a low statistic. The flagged share, tested against the calibration's
    promise, turns the status anyway; the promised share itself does not."""
    rng = np.random.default_rng(3)
    settings = DriftSettings(window_size=100, min_images=20)
    monitor = DriftMonitor(profiles(rng, 40), settings, promised_rate=0.02)
    healthy = monitor.add(profiles(rng, 100), [number % 50 == 0 for number in range(100)])
    assert healthy["status"] == "ok" and healthy["flagged"] == 2
    assert healthy["flag_rate_p_value"] > settings.flag_alpha and healthy["reasons"] == []
    flood = monitor.add(profiles(rng, 100), [number % 4 == 0 for number in range(100)])
    assert flood["statistic"] < settings.alert_level  # the KS statistic alone says "ok"
    assert flood["status"] == "drifting" and flood["reasons"] == ["flag_rate"]
    assert flood["flag_rate"] == 0.25 and flood["expected_flag_rate"] == 0.02
    assert flood["flag_rate_p_value"] < 1e-6
    # A line that expects 25 % defective parts says so, and the same traffic is fine.
    expecting = DriftMonitor(
        profiles(rng, 40), DriftSettings(100, 20, defect_rate=0.25), promised_rate=0.02
    )
    assert expecting.add(profiles(rng, 100), [n % 4 == 0 for n in range(100)])["status"] == "ok"


def test_the_promise_is_what_the_calibration_scores_can_show() -> None:
    """(k + 1) / (n + 1) expected, and a Clopper-Pearson bound that shrinks as images grow:
    20 images, none above the threshold, cannot show a rate below 14 %."""
    from detector.scoring import Calibration

    bounds = []
    for count in (20, 100, 1000):
        scores = list(np.linspace(0.0, 0.9, count))
        estimate = Calibration(1.0, 0.01, scores).estimate()
        assert estimate["above_threshold"] == 0 and estimate["calibration_images"] == count
        assert estimate["expected_false_alarm_rate"] == pytest.approx(1 / (count + 1), abs=1e-6)
        bounds.append(estimate["upper_bound"])
    assert bounds[0] == pytest.approx(1 - 0.05 ** (1 / 20), abs=1e-6)  # 0.139
    assert (
        "20 images cannot show a rate below 14%"
        in Calibration(1.0, 0.01, list(np.linspace(0, 0.9, 20))).estimate()["statement"]
    )
    assert bounds[0] > bounds[1] > bounds[2] and bounds[2] < 0.003
    some_above = Calibration(0.5, 0.01, list(np.linspace(0.0, 1.0, 101))).estimate()
    assert some_above["above_threshold"] == 50
    assert some_above["expected_false_alarm_rate"] == pytest.approx(51 / 102)
    assert some_above["lower_bound"] < 50 / 101 < some_above["upper_bound"]
    assert some_above["lower_bound"] > 0.4 and some_above["upper_bound"] < 0.6


def test_a_new_threshold_restarts_the_flag_window_but_keeps_the_profiles() -> None:
    """Verdicts made under the old threshold cannot test the new promise (issue 28: the
    service kept stating the old promise after a threshold-only version)."""
    from detector.drift import PROFILE_QUANTILES, DriftMonitor, DriftSettings

    reference = np.random.default_rng(0).random((30, PROFILE_QUANTILES.size))
    monitor = DriftMonitor(reference, DriftSettings(min_images=5), promised_rate=0.03)
    monitor.add(list(reference[:10]), [True] * 10)
    assert monitor.status()["flag_rate"] == 1.0
    monitor.new_operating_point(0.03)  # the same promise: nothing restarts
    assert monitor.status()["flag_rate"] == 1.0
    monitor.new_operating_point(0.30)
    status = monitor.status()
    assert status["promised_rate"] == 0.30 and status["images"] == 10
    assert status.get("flag_rate") is None
