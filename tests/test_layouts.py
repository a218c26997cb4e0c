"""MVTec AD 2 and VisA read in their own layouts, on tiny synthetic copies of each; an MVTec
AD 2 fit calibrates on its validation set, a session of its own."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from detector.data.layouts import MVTecAD2Category, VisACategory, open_category
from detector.data.mvtec import load_mask
from detector.data.synthetic import carpet_texture
from detector.errors import UserError
from devtools.in_process import run_detector


def write(path: Path, seed: int, size: int = 96) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = carpet_texture(size, np.random.default_rng(seed)) * 255
    Image.fromarray(pixels.astype(np.uint8)).save(path)


def write_mask(path: Path, value: int, size: int = 96) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    mask = np.zeros((size, size), np.uint8)
    mask[20:40, 30:50] = value
    Image.fromarray(mask).save(path)


@pytest.fixture(scope="module")
def ad2_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("mvtec_ad2")
    part = root / "fabric"
    for i in range(8):
        write(part / "train" / "good" / f"{i:03d}_regular.png", i)
    for i in range(5):
        write(part / "validation" / "good" / f"{i:03d}_regular.png", 100 + i)
    write(part / "test_public" / "good" / "000_regular.png", 200)
    for i in range(2):
        write(part / "test_public" / "bad" / f"{i:03d}_regular.png", 300 + i)
        write_mask(part / "test_public" / "ground_truth" / "bad" / f"{i:03d}_regular_mask.png", 255)
    write(part / "test_private" / "000_regular.png", 400)  # no ground truth: not read
    return root


def test_mvtec_ad2_reads_train_validation_and_the_public_test_set(ad2_root: Path) -> None:
    data = open_category("mvtec_ad2", ad2_root, "fabric")
    assert isinstance(data, MVTecAD2Category)
    assert len(data.train_paths()) == 8 and len(data.calibration_paths()) == 5
    samples = data.test_samples()
    assert [(s.label, s.defect_type) for s in samples] == [(0, "good"), (1, "bad"), (1, "bad")]
    assert load_mask(samples[1], (96, 96)).sum() == 20 * 20
    with pytest.raises(FileNotFoundError, match="MVTec AD 2 category folders"):
        open_category("mvtec_ad2", ad2_root, "walnuts").train_paths()


def test_visa_reads_its_split_csv_and_masks_marked_with_any_nonzero_value(
    tmp_path: Path,
) -> None:
    rows = ["object,split,label,image,mask"]
    for i in range(3):
        image = f"candle/Data/Images/Normal/{i:04d}.JPG"
        write(tmp_path / image, i)
        rows.append(f"candle,{'train' if i < 2 else 'test'},normal,{image},")
    image, mask = "candle/Data/Images/Anomaly/000.JPG", "candle/Data/Masks/Anomaly/000.png"
    write(tmp_path / image, 9)
    write_mask(tmp_path / mask, 1)  # VisA marks defects with small values
    rows.append(f"candle,test,anomaly,{image},{mask}")
    rows.append("pcb1,train,normal,pcb1/Data/Images/Normal/0000.JPG,")
    (tmp_path / "split_csv").mkdir()
    (tmp_path / "split_csv" / "1cls.csv").write_text("\n".join(rows) + "\n")
    data = open_category("visa", tmp_path, "candle")
    assert isinstance(data, VisACategory)
    assert len(data.train_paths()) == 2 and data.calibration_paths() == []
    samples = data.test_samples()
    assert [s.label for s in samples] == [0, 1]
    assert load_mask(samples[1], (96, 96)).sum() == 20 * 20
    with pytest.raises(UserError, match="lists no images of 'cashew'"):
        open_category("visa", tmp_path, "cashew").train_paths()
    with pytest.raises(UserError, match="data.layout is 'kaggle'"):
        open_category("kaggle", tmp_path, "candle")


def test_an_mvtec_ad2_fit_calibrates_on_its_validation_session(
    ad2_root: Path, tmp_path: Path, tiny_backbone_dir: Path
) -> None:
    common = [
        "data=mvtec",
        "data.layout=mvtec_ad2",
        f"data.root={ad2_root}",
        "data.category=fabric",
        "backbone=tiny_random",
        f"backbone.name={tiny_backbone_dir}",
        "backbone.resolution=96",
        f"model_dir={tmp_path / 'model'}",
        "progress=false",
    ]
    fit = run_detector(tmp_path, "fit", *common, f"hydra.run.dir={tmp_path / 'fit'}")
    assert fit.returncode == 0, fit.stderr[-3000:]
    summary = json.loads((tmp_path / "fit" / "fit_summary.json").read_text())
    assert summary["calibration"]["source"] == "session"
    assert summary["n_bank_images"] == 8 and summary["n_calibration_images"] == 5
    evaluate = run_detector(tmp_path, "evaluate", *common, f"hydra.run.dir={tmp_path / 'eval'}")
    assert evaluate.returncode == 0, evaluate.stderr[-3000:]
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["n_images"] == 3
