"""Fit, calibrate and predict on the synthetic MVTec-layout set with the tiny random backbone."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from detector.anomaly_detector import AnomalyDetector
from detector.data.mvtec import MVTecCategory, load_mask
from detector.dino import DinoBackbone
from detector.extractor import IncompatibleBankError
from detector.images import InvalidImageError
from detector.metrics import image_auroc
from devtools.in_process import run_detector

REPO = Path(__file__).resolve().parents[1]


def test_detector_separates_defects_from_normal_images(
    fitted_detector: AnomalyDetector, synthetic_dataset: MVTecCategory
) -> None:
    samples = synthetic_dataset.test_samples()
    results = fitted_detector.predict([s.path for s in samples], with_maps=False)
    labels = np.array([s.label for s in samples])
    scores = np.array([r.score for r in results])
    # A scorer that ignores the image (or shuffles patches) sits near 0.5.
    assert image_auroc(labels, scores) >= 0.9
    good = [r for r, s in zip(results, samples, strict=True) if s.label == 0]
    assert sum(r.is_anomalous for r in good) <= len(good) // 2
    for result in results:
        assert result.threshold == fitted_detector.calibration.threshold
        assert result.normalized_score == pytest.approx(result.score / result.threshold)
        assert result.is_anomalous == (result.score > result.threshold)


@pytest.mark.parametrize("defect", ["color", "hole"])
def test_heatmap_peaks_inside_obvious_defects(
    fitted_detector: AnomalyDetector, synthetic_dataset: MVTecCategory, defect: str
) -> None:
    samples = [s for s in synthetic_dataset.test_samples() if s.defect_type == defect]
    for sample, result in zip(
        samples, fitted_detector.predict([s.path for s in samples]), strict=True
    ):
        mask = load_mask(sample, result.image_size)
        assert result.anomaly_map.shape == mask.shape
        peak = np.unravel_index(np.argmax(result.anomaly_map), mask.shape)
        assert mask[peak], f"{sample.path.name}: heatmap peak {peak} is outside the defect"


def test_save_load_round_trip_gives_identical_scores_and_maps(
    fitted_detector: AnomalyDetector, saved_detector_dir: Path, synthetic_dataset: MVTecCategory
) -> None:
    paths = [s.path for s in synthetic_dataset.test_samples()[:6]]
    loaded = AnomalyDetector.load(saved_detector_dir, device="cpu")
    before, after = fitted_detector.predict(paths), loaded.predict(paths)
    for a, b in zip(before, after, strict=True):
        assert a.score == b.score and a.threshold == b.threshold
        np.testing.assert_array_equal(a.anomaly_map, b.anomaly_map)
    saved = json.loads((saved_detector_dir / "bank.json").read_text())
    for key in ("backbone", "layers", "resolution", "patch_size", "feature_dim"):
        assert key in saved["extractor"]
    assert saved["bank"]["coreset_ratio"] == 0.25
    assert saved["calibration"]["threshold"] == fitted_detector.calibration.threshold


def test_batch_size_does_not_change_scores(
    fitted_detector: AnomalyDetector, saved_detector_dir: Path, synthetic_dataset: MVTecCategory
) -> None:
    paths = [s.path for s in synthetic_dataset.test_samples()[:5]]
    one_by_one = AnomalyDetector.load(saved_detector_dir, batch_size=1, device="cpu")
    scores_1 = [r.score for r in one_by_one.predict(paths, with_maps=False)]
    scores_8 = [r.score for r in fitted_detector.predict(paths, with_maps=False)]
    np.testing.assert_allclose(scores_1, scores_8, atol=1e-5)


def test_bank_refuses_a_backbone_with_other_resolution(
    saved_detector_dir: Path, tiny_backbone_dir: Path
) -> None:
    other = DinoBackbone(str(tiny_backbone_dir), resolution=64, device="cpu")
    with pytest.raises(IncompatibleBankError, match="resolution 128 vs 64"):
        AnomalyDetector.load(saved_detector_dir, extractor=other)


def test_corrupt_image_gives_a_clear_error(
    fitted_detector: AnomalyDetector, tmp_path: Path
) -> None:
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(InvalidImageError, match="corrupt|not an image"):
        fitted_detector.predict([broken])


def test_any_image_size_gets_a_map_of_its_own_size(fitted_detector: AnomalyDetector) -> None:
    image = Image.new("RGB", (333, 97), (120, 90, 60))
    (result,) = fitted_detector.predict([image])
    assert result.anomaly_map.shape == (97, 333) and result.image_size == (333, 97)


def test_fit_and_evaluate_commands_write_metrics_plots_and_config(
    tmp_path: Path, tiny_backbone_dir: Path
) -> None:
    common = [
        "data=synthetic",
        f"data.root={tmp_path / 'data'}",
        "data.generate.size=96",
        "data.generate.n_train=12",
        "data.generate.n_test_good=4",
        "data.generate.n_per_defect=2",
        "backbone=tiny_random",
        f"backbone.name={tiny_backbone_dir}",
        "backbone.resolution=96",
        f"model_dir={tmp_path / 'model'}",
        "progress=false",
        "seed=3",
    ]
    fit = run_detector(tmp_path, "fit", *common, f"hydra.run.dir={tmp_path / 'fit'}")
    assert fit.returncode == 0, fit.stderr
    assert (tmp_path / "model" / "index.faiss").exists()
    resolved = (tmp_path / "fit" / "resolved_config.yaml").read_text()
    assert "seed: 3" in resolved and str(tiny_backbone_dir) in resolved
    assert (tmp_path / "fit" / ".hydra" / "config.yaml").exists()
    # Cross-fitted by default: every training image is in the bank and has a held-out score.
    calibration = json.loads((tmp_path / "fit" / "fit_summary.json").read_text())["calibration"]
    assert calibration["source"] == "cross_fitted" and calibration["folds"] == 5
    assert calibration["calibration_images"] == 12
    assert 0 < calibration["expected_false_alarm_rate"] < calibration["upper_bound"] < 1

    evaluate = run_detector(tmp_path, "evaluate", *common, f"hydra.run.dir={tmp_path / 'eval'}")
    assert evaluate.returncode == 0, evaluate.stderr
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    for key in ("image_auroc", "pixel_auroc", "aupro", "image_f1_max"):
        assert 0.0 <= metrics[key] <= 1.0
    assert metrics["n_images"] == 4 + 2 * 5
    assert metrics["random_weights"] is True
    assert metrics["calibration"]["calibration_images"] == 12
    assert "12 held-out defect-free images" in metrics["calibration"]["statement"]
    for picture in ("roc.png", "overlays.png"):
        with Image.open(tmp_path / "eval" / picture) as image:
            assert image.size[0] > 100


def test_fit_reproduces_the_same_bank_for_the_same_seed(
    tmp_path: Path, tiny_backbone_dir: Path, synthetic_root: Path
) -> None:
    banks = []
    for name in ("a", "b"):
        result = run_detector(
            tmp_path,
            "fit",
            "data=synthetic",
            f"data.root={synthetic_root}",
            f"backbone.name={tiny_backbone_dir}",
            "backbone=tiny_random",
            "progress=false",
            f"model_dir={tmp_path / name}",
            f"hydra.run.dir={tmp_path / ('run_' + name)}",
        )
        assert result.returncode == 0, result.stderr
        banks.append(json.loads((tmp_path / name / "bank.json").read_text()))
    assert banks[0]["calibration"] == banks[1]["calibration"]
    assert (tmp_path / "a" / "index.faiss").read_bytes() == (
        tmp_path / "b" / "index.faiss"
    ).read_bytes()


def test_fit_without_weights_prints_one_sentence(tmp_path: Path) -> None:
    result = run_detector(
        tmp_path,
        "fit",
        "data=synthetic",
        f"data.root={tmp_path}",
        "data.generate.size=64",
        "data.generate.n_train=2",
        f"model_dir={tmp_path / 'm'}",
        f"hydra.run.dir={tmp_path / 'r'}",
    )
    assert result.returncode == 2
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and "HF_TOKEN" in error_lines[0]
    assert "Traceback" not in result.stderr


def test_a_calibration_session_sets_the_threshold_and_an_empty_one_is_refused(
    tmp_path: Path, tiny_backbone_dir: Path, synthetic_root: Path
) -> None:
    common = [
        "data=synthetic",
        f"data.root={synthetic_root}",
        "backbone=tiny_random",
        f"backbone.name={tiny_backbone_dir}",
        "backbone.resolution=96",
        "progress=false",
    ]
    empty = tmp_path / "empty"
    empty.mkdir()
    refused = run_detector(tmp_path, "fit", *common, f"data.calibration_dir={empty}",
        f"model_dir={tmp_path / 'refused'}", f"hydra.run.dir={tmp_path / 'r'}",
    )  # fmt: skip
    assert refused.returncode == 2 and "holds no images" in refused.stderr
    assert "Traceback" not in refused.stderr and not (tmp_path / "refused").exists()
    session = synthetic_root / "carpet" / "test" / "good"
    fitted = run_detector(tmp_path, "fit", *common, f"data.calibration_dir={session}",
        f"model_dir={tmp_path / 'model'}", f"hydra.run.dir={tmp_path / 'fit'}",
    )  # fmt: skip
    assert fitted.returncode == 0, fitted.stderr
    summary = json.loads((tmp_path / "fit" / "fit_summary.json").read_text())
    assert summary["calibration"]["source"] == "session"
    assert summary["calibration"]["calibration_images"] == len(list(session.glob("*.png")))
    assert summary["n_bank_images"] == len(list((synthetic_root / "carpet/train/good").iterdir()))


def test_fit_with_missing_data_root_says_where_it_looked(tmp_path: Path) -> None:
    result = run_detector(
        tmp_path,
        "fit",
        f"data.root={tmp_path / 'nowhere'}",
        f"hydra.run.dir={tmp_path / 'r'}",
    )
    assert result.returncode == 2
    assert "MVTec AD" in result.stderr and "Traceback" not in result.stderr
