import numpy as np
import pytest
from sklearn.metrics import precision_recall_curve, roc_auc_score

from detector.metrics import aupro, f1_max, image_auroc, pixel_auroc


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(7)


def test_image_and_pixel_auroc_equal_sklearn(rng: np.random.Generator) -> None:
    labels = rng.integers(0, 2, 200)
    scores = rng.normal(size=200) + labels * 0.8
    assert image_auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores))
    masks = rng.random((4, 16, 16)) > 0.8
    maps = rng.normal(size=(4, 16, 16)) + masks
    assert pixel_auroc(masks, maps) == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()))


def test_f1_max_matches_a_direct_computation(rng: np.random.Generator) -> None:
    labels = rng.integers(0, 2, 150)
    scores = rng.normal(size=150) + labels
    precision, recall, _ = precision_recall_curve(labels, scores)
    expected = np.max(2 * precision * recall / np.maximum(precision + recall, 1e-12))
    assert f1_max(labels, scores) == pytest.approx(expected)
    assert 0.5 < f1_max(labels, scores) <= 1.0


def test_one_class_gives_none_not_a_crash() -> None:
    assert image_auroc(np.zeros(5), np.arange(5)) is None
    assert f1_max(np.ones(5), np.arange(5)) is None


def _two_region_masks() -> np.ndarray:
    masks = np.zeros((2, 20, 20), dtype=bool)
    masks[0, 2:6, 2:6] = True
    masks[1, 10:15, 10:18] = True
    return masks


def test_aupro_is_one_for_a_perfect_map() -> None:
    masks = _two_region_masks()
    assert aupro(masks, masks.astype(float) + 0.1) == pytest.approx(1.0)


def test_aupro_is_zero_for_an_inverted_map() -> None:
    masks = _two_region_masks()
    assert aupro(masks, (~masks).astype(float)) == pytest.approx(0.0)


def test_aupro_of_a_constant_map_is_the_diagonal() -> None:
    # One threshold takes FPR and PRO from 0 to 1 together: the area under y = x up to
    # 0.3 is 0.045, normalised by 0.3 -> 0.15.
    masks = _two_region_masks()
    assert aupro(masks, np.ones(masks.shape)) == pytest.approx(0.15)


def test_aupro_averages_over_regions() -> None:
    # Region one scores above every normal pixel, region two below all of them: PRO is 0.5
    # from FPR 0 up to the limit.
    masks = _two_region_masks()
    maps = np.full(masks.shape, 0.5)
    maps[0][masks[0]] = 1.0
    maps[1][masks[1]] = 0.0
    assert aupro(masks, maps) == pytest.approx(0.5)


def test_aupro_needs_both_pixel_kinds() -> None:
    assert aupro(np.zeros((1, 4, 4), bool), np.ones((1, 4, 4))) is None
