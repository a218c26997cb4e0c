"""The drift statistic: low for the calibration distribution, high for a shifted one."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
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

    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "detector",
            "set-drift-reference",
            str(model_dir),
            str(accepted),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert result.returncode == 0, result.stderr
    after = AnomalyDetector.load(model_dir)
    new = drift_report(np.asarray(after.calibration.reference_profiles), profiles, settings)
    assert len(after.calibration.reference_profiles) == 8
    assert after.calibration.threshold == before.calibration.threshold  # only the reference
    assert old["statistic"] > 0.8 and new["statistic"] < 0.35

    missing = subprocess.run(
        [
            sys.executable,
            "-m",
            "detector",
            "set-drift-reference",
            str(model_dir),
            str(tmp_path / "no"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert missing.returncode == 2
    assert missing.stderr.strip().startswith("error:") and "Traceback" not in missing.stderr
