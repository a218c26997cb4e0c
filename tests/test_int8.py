"""A static INT8 backbone per product (detector.quantized): the self-check's figures and
sentences, a damaged quantization refused and served in f32, and an accepted one served on
every surface with the verdicts its check promised."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from batch.__main__ import main as batch_main
from batch.results import read_rows
from detector.anomaly_detector import AnomalyDetector
from detector.banks import products, versions
from detector.banks.models import load_pair, save_bank, stored
from detector.data.mvtec import MVTecCategory, split_calibration
from detector.int8_check import (
    CHECK_IMAGES_FILE,
    INT8_FOLDER,
    INT8_KEY,
    Int8Check,
    bank_identity,
    status,
)
from detector.quantized import Int8Backbone, make_int8, product_extractor
from devtools.http_client import http_client
from devtools.in_process import bentoml_home, run_detector, run_main
from devtools.local_server import bentoml_serve

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
LINE_KEY, ADMIN_KEY = "int8-line-key-0123456789", "int8-admin-key-0123456789"
LINE, ADMIN = {"X-API-Key": LINE_KEY}, {"X-API-Key": ADMIN_KEY}


def test_the_check_accepts_the_same_order_and_says_why_it_refuses_another() -> None:
    f32 = np.linspace(0.1, 0.3, 100)  # 2.02e-3 apart
    threshold = f32[96] + 5e-5
    same = Int8Check.measure(f32, f32 + 1e-4, threshold, bank="b")
    assert same.accepted and same.reason == "" and same.rank_correlation == 1.0
    assert same.agreement == 0.99  # f32[96] crossed the threshold: one verdict of 100 moved
    swapped = f32.copy()
    swapped[::2], swapped[1::2] = f32[::-1][::2], f32[::-1][1::2]  # the order reversed
    refused = Int8Check.measure(f32, swapped, threshold, bank="b")
    assert not refused.accepted and "ranks the 100 check images differently" in refused.reason
    two_moved = Int8Check.measure(f32, f32 + 3e-3, threshold, bank="b")
    assert two_moved.rank_correlation == 1.0 and not two_moved.accepted
    assert "agree with f32 on 98.0% of the check images" in two_moved.reason
    # A new threshold restates the verdicts from the same scores.
    assert same.at_threshold(0.5).agreement == 1.0 and same.at_threshold(0.5).accepted
    # What a version says: served in int8 only for the rows and mask the check was made for.
    document = {"calibration": {"threshold": threshold}, INT8_KEY: {"check": same.to_dict()}}
    assert status(document, 7) is not None
    document[INT8_KEY]["check"]["bank"] = bank_identity(7, document)
    assert status(document, 7)["served"] == "int8"
    moved = status(document, 8)  # learned rows the check did not see
    assert moved["served"] == "f32" and "check-int8" in moved["reason"]
    assert status({"calibration": {}}, 7) is None  # asked for f32: nothing to say


def detector_copy(fitted: AnomalyDetector) -> AnomalyDetector:
    """The session's fitted detector with a bank of its own (make_int8 writes its metadata)."""
    return AnomalyDetector(fitted.extractor, fitted.bank.copy(), fitted.calibration, fitted.scoring)


def test_a_quantization_calibrated_on_black_frames_is_refused_and_served_in_f32(
    fitted_detector: AnomalyDetector,
    synthetic_dataset: MVTecCategory,
    store_copy,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The fixture's held-out images are not in its bank: the check's images.
    _, held_out = split_calibration(synthetic_dataset.train_paths(), 0.25, 0)
    detector = detector_copy(fitted_detector)
    black = [Image.new("RGB", (256, 256))] * 8
    check = make_int8(detector, black, held_out, tmp_path / "model")
    assert not check.accepted and check.rank_correlation < 0.99, check.summary()
    assert (tmp_path / "model" / INT8_FOLDER / CHECK_IMAGES_FILE).exists()
    home = store_copy(tmp_path / "home")
    with bentoml_home(home):
        backbone = stored(stored("bank-carpet:v1").info.metadata["backbone_model"])
        version = save_bank(detector.save(tmp_path / "model"), backbone, force=True)
        assert (Path(version.path) / INT8_FOLDER / "backbone.xml").exists()
        with caplog.at_level(logging.WARNING, logger="detector.quantized"):
            pair = load_pair(product="carpet", device="cpu")
    assert not isinstance(pair.detector.extractor, Int8Backbone)
    (line,) = [r.message for r in caplog.records if "asks for int8" in r.message]
    assert "is served in f32: the int8 backbone ranks the" in line


def test_a_version_is_served_in_int8_only_by_the_graph_its_check_ran_on(
    fitted_detector: AnomalyDetector,
    synthetic_dataset: MVTecCategory,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    bank_images, held_out = split_calibration(synthetic_dataset.train_paths(), 0.25, 0)
    detector = detector_copy(fitted_detector)
    check = make_int8(detector, bank_images, held_out, tmp_path)
    assert check.rank_correlation >= 0.99, check.summary()  # the order held on its images
    # The tiny random backbone puts a check image near its threshold; judged at a threshold
    # no image is near (the operating point moved), the same check holds.
    document, size = dict(detector.bank.metadata), detector.bank.size
    # bank.json's calibration, as `save` writes it (this test saves nothing).
    document["calibration"] = {**detector.calibration.to_dict(), "threshold": 10.0}
    shared = fitted_detector.extractor
    served, state = product_extractor(tmp_path, document, size, shared)
    assert isinstance(served, Int8Backbone) and state["served"] == "int8"
    # Another graph in the folder (a restored or copied one): f32, and said why.
    other = {**document, INT8_KEY: {**document[INT8_KEY], "graph_sha256": "0" * 16}}
    with caplog.at_level(logging.WARNING, logger="detector.quantized"):
        served, state = product_extractor(tmp_path, other, size, shared)
    assert served is shared and "not the one its check ran on" in state["reason"]
    assert "asks for int8 but is served in f32" in caplog.text
    # A damaged section is one sentence, never an exception (it would block every change).
    damaged = status({**document, INT8_KEY: {"check": {"f32_scores": 1}}}, size)
    assert damaged["served"] == "f32" and "cannot be read" in damaged["reason"]
    # Scores that cannot be ranked are refused, and stay valid JSON (no NaN).
    flat = Int8Check.measure([0.1] * 8, [0.1] * 8, 0.5, "b")
    assert not flat.accepted and flat.rank_correlation is None and "cannot be ranked" in flat.reason
    json.dumps(flat.to_dict(), allow_nan=False)


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_an_int8_product_is_served_by_its_graph_with_the_verdicts_its_check_promised(
    tiny_backbone_dir: Path, tmp_path: Path
) -> None:
    """`fit precision=int8` to the served page: /products states the check; the check
    images, sent as uploads, get the int8 scores the check recorded and the verdicts it
    promised, in the service and the batch job; a mask leaves the check stale (served in
    f32, said why) until `check-int8` runs it again; replay decides every record again alike."""
    home = tmp_path / "home"
    overrides = [
        "data=synthetic",
        f"data.root={tmp_path / 'data'}",
        "data.generate.size=128",
        "data.generate.n_train=24",
        "data.generate.n_test_good=1",
        "data.generate.n_per_defect=1",
        "backbone=tiny_random",
        f"backbone.name={tiny_backbone_dir}",
        f"model_dir={tmp_path / 'model'}",
        "progress=false",
        "precision=int8",
        f"hydra.run.dir={tmp_path / 'fit'}",
    ]
    # The check's reference is f32: a fit on another precision is refused before it loads.
    refused = run_detector(home, "fit", *overrides, "backbone.runtime=onnxruntime",
                           "backbone.precision=int8")  # fmt: skip
    assert refused.returncode != 0 and "checked against f32" in refused.stderr
    fit = run_detector(home, "fit", *overrides)
    assert fit.returncode == 0, fit.stderr[-3000:]
    summary = json.loads((tmp_path / "fit" / "fit_summary.json").read_text())
    assert summary["int8"]["served"] == "int8", summary["int8"]
    assert summary["int8"]["check"]["images"] == 8  # kept out of the 24-image bank
    assert summary["n_bank_images"] == 16
    # evaluate precision=int8 scores the test split with the product's int8 graph.
    evaluated = {}
    for precision in ("int8", "f32"):
        run_dir = tmp_path / f"evaluate-{precision}"
        overrides_now = [*overrides[:-2], f"precision={precision}", f"hydra.run.dir={run_dir}"]
        evaluation = run_detector(home, "evaluate", *overrides_now)
        assert evaluation.returncode == 0, evaluation.stderr[-3000:]
        evaluated[precision] = json.loads((run_dir / "metrics.json").read_text())
    assert evaluated["int8"]["runtime"]["precision"] == "int8-static"
    assert evaluated["f32"]["runtime"]["precision"] == "f32"
    exported = run_detector(home, "export", str(tmp_path / "model"))
    assert exported.returncode == 0, exported.stderr[-3000:]
    check = Int8Check.from_dict(
        json.loads((tmp_path / "model" / "bank.json").read_text())[INT8_KEY]["check"]
    )
    with np.load(tmp_path / "model" / INT8_FOLDER / CHECK_IMAGES_FILE) as stored_images:
        uploads = [png(pixels) for pixels in stored_images["pixels"]]
    folder = tmp_path / "check_images"
    folder.mkdir()
    for number, data in enumerate(uploads):
        (folder / f"{number:02d}.png").write_bytes(data)
    keys = f"cam1=line:{LINE_KEY},boss=admin:{ADMIN_KEY}"
    records = {"INSPECT_RECORDS_DIR": str(tmp_path / "records"), "INSPECT_KEEP_IMAGES": "all"}
    settings = {"INSPECT_API_KEYS": keys, "INSPECT_BANK_REFRESH_S": "0", **records}
    with bentoml_serve(home, tmp_path / "serve.log", **settings) as url:
        (listed,) = http_client.get(f"{url}/products", headers=LINE, timeout=30).json()
        assert listed["int8"]["served"] == "int8" and listed["int8"]["check"]["accepted"]
        served = []
        for data in uploads:
            files = {"image": ("part.png", data, "image/png")}
            answer = http_client.post(f"{url}/inspect", files=files, headers=LINE, timeout=60)
            assert answer.status_code == 200, answer.text
            served.append(answer.json())
        threshold = served[0]["threshold"]
        assert threshold == pytest.approx(check.threshold)
        # The scores the check recorded for int8, and verdicts as f32's on >= 99 %.
        assert [s["score"] for s in served] == pytest.approx(list(check.int8_scores), abs=1e-5)
        int8_verdicts = [s["is_anomalous"] for s in served]
        assert int8_verdicts == [score > threshold for score in check.int8_scores]
        f32_verdicts = [score > threshold for score in check.f32_scores]
        agreeing = np.mean(np.equal(int8_verdicts, f32_verdicts))
        assert agreeing >= 0.99 and agreeing == check.agreement
        batch = run_main(batch_main, home, str(folder), "--out", str(tmp_path / "out"))
        assert batch.returncode == 0, batch.stderr[-3000:]
        rows = sorted(read_rows(tmp_path / "out" / "results.jsonl"), key=lambda r: r["path"])
        assert [r["score"] for r in rows] == pytest.approx(list(check.int8_scores), abs=1e-5)
        # A mask changes the scores: served in f32 until the check runs again.
        mask = np.full((128, 128), 255, np.uint8)
        mask[:, 96:] = 0
        put = http_client.put(
            f"{url}/products/carpet/mask",
            files={"mask": ("mask.png", png(mask), "image/png")},
            data={"reason": "clamp"},
            headers=ADMIN,
            timeout=60,
        )
        assert put.status_code == 200, put.text
        http_client.post(f"{url}/inspect", files={"image": ("p.png", uploads[0])}, headers=LINE)
        (listed,) = http_client.get(f"{url}/products", headers=LINE, timeout=30).json()
        assert listed["int8"]["served"] == "f32" and "check-int8" in listed["int8"]["reason"]
        again = run_detector(home, "check-int8", "carpet")
        assert again.returncode == 0, again.stderr[-3000:]
        assert json.loads(again.stdout)["int8"]["served"] == "int8"
        http_client.post(f"{url}/inspect", files={"image": ("p.png", uploads[0])}, headers=LINE)
        (listed,) = http_client.get(f"{url}/products", headers=LINE, timeout=30).json()
        assert listed["int8"]["served"] == "int8" and listed["version"] == "v3"
    # Each recorded decision made again by the version that made it, int8 or f32 as then.
    replayed = run_detector(home, "replay", "--out", str(tmp_path / "replay.json"), **records)
    assert replayed.returncode == 0, replayed.stdout[-3000:] + replayed.stderr[-3000:]
    report = json.loads((tmp_path / "replay.json").read_text())
    assert report["checked"] == 10 and report["same"] == 10 and report["other_settings"] == 0
    # Added images change the rows: the change runs the check again on the new bank.
    added = run_detector(
        home, "add-images", "carpet", str(tmp_path / "data" / "carpet" / "test" / "good")
    )
    assert added.returncode == 0, added.stderr[-3000:]
    with bentoml_home(home):
        described = versions.describe(products.live_model("carpet"))
    assert described["version"] == "v4" and described["change"]["action"] == "add_images"
    # Run for this version's rows (not stale); served in int8 exactly where it holds.
    assert "rows or mask changed" not in described["int8"]["reason"], described["int8"]
    accepted = described["int8"]["check"]["accepted"]
    assert described["int8"]["served"] == ("int8" if accepted else "f32")
    log = (tmp_path / "serve.log").read_text()
    assert "asks for int8 but is served in f32: the bank's rows or mask changed" in log
