"""Live drift on a real `bentoml serve`: low on clean traffic, high on shifted traffic, and
the batch job reports the same statistic for the same images."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from batch.__main__ import main as batch_main
from detector.data.shifts import apply_shift
from detector.data.synthetic import make_dataset
from devtools.http_client import http_client
from devtools.in_process import run_main
from devtools.local_server import bentoml_serve

WINDOW = "20"


@pytest.fixture(scope="module")
def traffic(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """20 new defect-free images (another seed: the same line, other parts) and the same 20
    images 30 % brighter, each in its own folder."""
    root = tmp_path_factory.mktemp("line")
    make_dataset(root, "carpet", size=128, n_train=20, n_test_good=0, n_per_defect=0, seed=11)
    clean = root / "carpet" / "train" / "good"
    brighter = root / "brighter"
    brighter.mkdir()
    for path in sorted(clean.glob("*.png")):
        with Image.open(path) as image:
            apply_shift(image, "brightness", 1.3).save(brighter / path.name)
    return {"clean": clean, "brighter": brighter}


@pytest.fixture(scope="module")
def server(store: Path, tmp_path_factory: pytest.TempPathFactory):
    log = tmp_path_factory.mktemp("logs") / "serve.log"
    env = {"INSPECT_DRIFT_WINDOW": WINDOW, "INSPECT_DRIFT_MIN_IMAGES": "10"}
    with bentoml_serve(store, log, **env) as url:
        yield url


def send_folder(url: str, folder: Path) -> None:
    def inspect(path: Path) -> None:
        files = {"image": (path.name, path.read_bytes(), "image/png")}
        response = http_client.post(f"{url}/inspect", files=files, timeout=120)
        assert response.status_code == 200, response.text
        assert "drift_profile" not in response.json()  # only on request

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(inspect, sorted(folder.glob("*.png"))))


def drift(url: str) -> dict:
    response = http_client.post(f"{url}/drift", json={}, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


def gauge(url: str) -> float | None:
    """The drift gauge's one sample, or None when the series is absent."""
    lines = http_client.get(f"{url}/metrics", timeout=30).text.splitlines()
    samples = [line for line in lines if line.startswith("inspection_drift_statistic")]
    assert len(samples) <= 1, samples  # one series, whichever processes import telemetry
    return float(samples[0].split()[-1]) if samples else None


def batch_drift(store: Path, folder: Path, out: Path) -> dict:
    command = [str(folder), "--out", str(out), "--drift-min-images", "10", "--no-progress"]
    result = run_main(batch_main, store, *command)
    assert result.returncode == 0, result.stderr
    return json.loads((out / "summary.json").read_text())["drift"]


def test_drift_gauge_stays_low_on_clean_traffic_and_rises_on_brighter_images(
    server: str, traffic: dict[str, Path], store: Path, tmp_path: Path
) -> None:
    before = drift(server)
    assert before["status"] == "warming_up" and before["images"] == 0
    assert gauge(server) is None  # absent, not 0 ("like calibration"), before a statistic

    send_folder(server, traffic["clean"])
    clean = drift(server)
    assert clean["images"] == 20 and clean["status"] == "ok"
    assert clean["statistic"] < 0.3, clean
    assert gauge(server) == pytest.approx(clean["statistic"], abs=1e-6)

    send_folder(server, traffic["brighter"])  # the window (20) now holds only these
    shifted = drift(server)
    assert shifted["status"] == "drifting" and shifted["images"] == 20
    assert shifted["statistic"] > 0.8 and shifted["statistic"] > clean["statistic"] + 0.4
    assert gauge(server) == pytest.approx(shifted["statistic"], abs=1e-6)

    # The batch job's statistic for the same images is the service's, to the last digit.
    assert batch_drift(store, traffic["clean"], tmp_path / "clean")["statistic"] == pytest.approx(
        clean["statistic"], abs=1e-9
    )
    brighter_report = batch_drift(store, traffic["brighter"], tmp_path / "brighter")
    assert brighter_report["statistic"] == pytest.approx(shifted["statistic"], abs=1e-9)
    assert brighter_report["status"] == "drifting"


def test_drift_reference_comes_from_the_served_bank(server: str, saved_detector_dir: Path) -> None:
    bank = json.loads((saved_detector_dir / "bank.json").read_text())
    served = http_client.post(f"{server}/drift", json={"reference": True}, timeout=30).json()
    assert served["reference_images"] == len(bank["calibration"]["reference_profiles"])
    np.testing.assert_allclose(
        served["reference_profiles"], bank["calibration"]["reference_profiles"], rtol=1e-6
    )


def p_value_gauge(url: str) -> float | None:
    lines = http_client.get(f"{url}/metrics", timeout=30).text.splitlines()
    samples = [line for line in lines if line.startswith("inspection_flag_rate_p_value")]
    return float(samples[0].split()[-1]) if samples else None


def test_a_flood_of_flagged_parts_turns_the_status_while_the_statistic_stays_low(
    server: str, traffic: dict[str, Path], store: Path, tmp_path: Path
) -> None:
    """Clean parts, each with a small dark mark: every one is flagged, while the profiles
    (the lower 90 % of patches) still look like calibration. The page, /drift, the gauge
    and the batch summary all say so."""
    marked = tmp_path / "marked"
    marked.mkdir()
    for number, path in enumerate(sorted(traffic["clean"].glob("*.png"))):
        pixels = np.asarray(Image.open(path).convert("RGB")).copy()
        y, x = 20 + 3 * number, 30 + 2 * number
        pixels[y : y + 24, x : x + 24] = 0
        Image.fromarray(pixels).save(marked / path.name)
    send_folder(server, marked)
    flood = drift(server)
    assert flood["images"] == 20 and flood["flagged"] == 20
    assert flood["statistic"] < flood["alert_level"], flood  # the statistic alone: "ok"
    assert flood["status"] == "drifting" and flood["reasons"] == ["flag_rate"]
    assert flood["flag_rate_p_value"] < 0.001 < flood["expected_flag_rate"]
    assert p_value_gauge(server) == pytest.approx(flood["flag_rate_p_value"], rel=1e-3)
    report = batch_drift(store, marked, tmp_path / "batch")
    assert report["status"] == "drifting" and report["reasons"] == ["flag_rate"]
    assert report["flagged"] == 20 and report["expected_flag_rate"] == flood["expected_flag_rate"]
