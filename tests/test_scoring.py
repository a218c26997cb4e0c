import numpy as np
import pytest

from detector.scoring import ScoringConfig, anomaly_map, calibrate, image_score, make_result


def test_top_percent_score_is_the_mean_of_the_highest_patches() -> None:
    grid = np.arange(400, dtype=np.float32).reshape(20, 20)
    # 1 % of 400 patches = 4 patches: 399, 398, 397, 396.
    assert image_score(grid, ScoringConfig()) == pytest.approx(397.5)
    assert image_score(grid, ScoringConfig(image_score="max")) == 399.0
    assert image_score(grid, ScoringConfig(top_percent=10)) == pytest.approx(379.5)
    with pytest.raises(ValueError):
        image_score(grid, ScoringConfig(image_score="median"))


def test_anomaly_map_has_the_original_size_and_keeps_the_peak_place() -> None:
    grid = np.zeros((8, 8), np.float32)
    grid[2, 5] = 1.0
    amap = anomaly_map(grid, patch_size=16, image_size=(300, 200), sigma=4)
    assert amap.shape == (200, 300)
    row, col = np.unravel_index(np.argmax(amap), amap.shape)
    assert 2 / 8 * 200 <= row < 3 / 8 * 200
    assert 5 / 8 * 300 <= col < 6 / 8 * 300


def test_blur_lowers_the_peak_but_not_the_mass() -> None:
    grid = np.zeros((8, 8), np.float32)
    grid[4, 4] = 1.0
    sharp = anomaly_map(grid, 8, (64, 64), sigma=0)
    smooth = anomaly_map(grid, 8, (64, 64), sigma=4)
    assert smooth.max() < sharp.max()
    assert smooth.sum() == pytest.approx(sharp.sum(), rel=0.02)


def test_calibration_meets_the_false_alarm_rate_on_its_own_scores() -> None:
    scores = np.random.default_rng(0).normal(size=1000)
    calibration = calibrate(scores, 0.01)
    assert (scores > calibration.threshold).mean() <= 0.01
    assert (scores > calibration.threshold).mean() >= 0.005
    assert calibration.reference_scores == pytest.approx(scores.tolist())


def test_few_calibration_images_give_the_highest_normal_score() -> None:
    assert calibrate([0.1, 0.3, 0.2], 0.01).threshold == 0.3
    with pytest.raises(ValueError):
        calibrate([], 0.01)


def test_result_carries_threshold_normalised_score_and_verdict() -> None:
    calibration = calibrate([0.2, 0.4], 0.01)
    high = make_result(0.6, calibration, (10, 20))
    low = make_result(0.2, calibration, (10, 20))
    assert high.is_anomalous and not low.is_anomalous
    assert high.normalized_score == pytest.approx(1.5)
    assert high.to_dict()["threshold"] == 0.4
    assert high.to_dict()["image_width"] == 10 and high.to_dict()["image_height"] == 20


def test_separable_map_equals_upsample_blur_resize_step_by_step() -> None:
    import torch
    import torch.nn.functional as F
    from scipy.ndimage import gaussian_filter

    grid = np.random.default_rng(2).random((7, 9)).astype(np.float32)

    def resize(array: np.ndarray, height: int, width: int) -> np.ndarray:
        tensor = torch.from_numpy(array)[None, None]
        return F.interpolate(tensor, (height, width), mode="bilinear", align_corners=False)[0, 0]

    # 16 px per cell: a 7 x 9 grid spans 112 x 144 input px (a tiled frame's grid is not square)
    step_by_step = gaussian_filter(resize(grid, 112, 144).numpy(), 4, truncate=4.0, mode="reflect")
    expected = resize(np.ascontiguousarray(step_by_step), 150, 230).numpy()
    np.testing.assert_allclose(anomaly_map(grid, 16, (230, 150), 4.0), expected, atol=1e-5)


@pytest.mark.parametrize("scores", [[0.0, 0.0, 0.0], [float("nan"), 0.1], [float("inf"), 0.2]])
def test_calibration_refuses_a_threshold_that_is_not_a_finite_number_above_0(scores) -> None:
    with pytest.raises(ValueError, match="not a finite number above 0"):
        calibrate(scores, 0.01)


def test_a_score_that_is_not_a_number_is_anomalous_and_never_nan_in_json(
    fitted_detector,
) -> None:
    """Features gone NaN (a broken backbone, fp16 overflow) must stop the line, not pass it,
    and the answer must stay strict JSON."""
    import json

    from detector.anomaly_detector import AnomalyDetector

    class NaNExtractor:
        spec = fitted_detector.extractor.spec
        device = fitted_detector.extractor.device
        random_weights = True
        prepare = fitted_detector.extractor.prepare

        def embed(self, batch: np.ndarray) -> np.ndarray:
            features = fitted_detector.extractor.embed(batch)
            return np.full_like(features, np.nan)

    detector = AnomalyDetector(
        NaNExtractor(), fitted_detector.bank, fitted_detector.calibration, batch_size=1
    )
    from PIL import Image

    (result,) = detector.predict([Image.new("RGB", (40, 30), (120, 90, 60))])
    assert result.is_anomalous
    answer = result.to_dict()
    assert answer["score"] is None and answer["normalized_score"] is None
    json.dumps(answer, allow_nan=False)  # raises on NaN or Infinity
