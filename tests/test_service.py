"""The BentoML bundle, served for real: `bentoml serve` on a free port with tiny models."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import bentoml
import httpx
import numpy as np
import pytest
from PIL import Image

from detector.anomaly_detector import AnomalyDetector
from detector.data.mvtec import MVTecCategory
from detector.data.synthetic import carpet_texture
from devtools.http_client import http_client
from devtools.local_server import bentoml_serve, service_env, stored_model

MAX_BYTES = 1_000_000


def png(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def server(store: Path, tmp_path_factory: pytest.TempPathFactory):
    log = tmp_path_factory.mktemp("logs") / "serve.log"
    # Batching is off by default on CPU; this server exercises the batching path a GPU uses.
    with bentoml_serve(
        store, log, INSPECT_MAX_BYTES=str(MAX_BYTES), INSPECT_MAX_BATCH_SIZE="4"
    ) as url:
        yield url


@pytest.fixture(scope="module")
def test_paths(synthetic_dataset: MVTecCategory) -> list[Path]:
    return [sample.path for sample in synthetic_dataset.test_samples()]


def post_image(url: str, endpoint: str, data: bytes, **fields: str) -> httpx.Response:
    files = {"image": ("upload.png", data, "application/octet-stream")}
    return http_client.post(f"{url}/{endpoint}", files=files, data=fields, timeout=120)


def test_models_list_shows_backbone_and_bank(store: Path) -> None:
    listing = subprocess.run(
        [sys.executable, "-m", "bentoml", "models", "list", "-o", "json"],
        env=service_env(store),
        capture_output=True,
        text=True,
        check=True,
    )
    tags = {row["tag"].split(":")[0]: row for row in json.loads(listing.stdout)}
    assert {"dino-backbone", "bank-carpet"} <= set(tags)
    bank = stored_model(store, "bank-carpet:latest")
    assert bank["labels"]["category"] == "carpet"
    assert bank["labels"]["backbone_model"].startswith("dino-backbone")
    assert bank["metadata"]["extractor"]["resolution"] == 128


def test_served_scores_equal_in_process_predict(
    server: str, fitted_detector: AnomalyDetector, test_paths: list[Path]
) -> None:
    expected = fitted_detector.predict(test_paths, with_maps=False)
    with bentoml.SyncHTTPClient(server) as client:
        for path, want in zip(test_paths, expected, strict=True):
            got = client.inspect(image=path)
            assert got["score"] == pytest.approx(want.score, abs=1e-5)
            assert got["threshold"] == pytest.approx(want.threshold, abs=1e-9)
            assert got["is_anomalous"] == want.is_anomalous
            assert got["models"]["backbone"].startswith("dino-backbone:")
            assert got["models"]["bank"].startswith("bank-carpet:")
            assert got["timing_ms"]["total"] > 0


def test_heatmap_equals_in_process_map(
    server: str, fitted_detector: AnomalyDetector, test_paths: list[Path]
) -> None:
    for path in test_paths[:3]:
        (want,) = fitted_detector.predict([path])
        response = post_image(server, "heatmap", path.read_bytes(), output="npy")
        assert response.status_code == 200, response.text
        served = np.load(io.BytesIO(response.content))
        np.testing.assert_allclose(served, want.anomaly_map, atol=1e-5)
        assert float(response.headers["x-anomaly-score"]) == pytest.approx(want.score, abs=1e-5)

        overlay = post_image(server, "heatmap", path.read_bytes())
        assert overlay.headers["content-type"] == "image/png"
        with Image.open(io.BytesIO(overlay.content)) as picture:
            assert picture.size == want.image_size and picture.mode == "RGB"
        raw = post_image(server, "heatmap", path.read_bytes(), output="map")
        with Image.open(io.BytesIO(raw.content)) as picture:
            assert picture.size == want.image_size and picture.mode.startswith("I")


def test_an_explanation_is_refused_without_a_key_where_scoring_is_open(
    server: str, test_paths: list[Path]
) -> None:
    """This server has no key (scoring open on loopback): explain=true reveals patches of
    the bank's training images, so it needs a reviewer's key even here; scoring answers."""
    data = test_paths[0].read_bytes()
    assert post_image(server, "inspect", data).status_code == 200
    for endpoint in ("inspect", "heatmap"):
        refused = post_image(server, endpoint, data, explain="true")
        assert refused.status_code == 401 and "explain=true" in refused.json()["error"]


def test_inspect_batch_answers_in_order_with_errors_in_place(
    server: str, fitted_detector: AnomalyDetector, test_paths: list[Path]
) -> None:
    chosen = test_paths[:3]
    files = [("images", (p.name, p.read_bytes(), "image/png")) for p in chosen]
    files.insert(1, ("images", ("notes.txt", b"not an image", "text/plain")))
    response = http_client.post(f"{server}/inspect_batch", files=files, timeout=120)
    assert response.status_code == 200
    answers = response.json()
    assert len(answers) == 4
    assert answers[1]["reason"] == "not_an_image"
    expected = fitted_detector.predict(chosen, with_maps=False)
    for answer, want in zip([answers[0], answers[2], answers[3]], expected, strict=True):
        assert answer["score"] == pytest.approx(want.score, abs=1e-5)


def metric_sum(metrics: str, prefix: str) -> float:
    """Sum of every sample whose line starts with `prefix` (all label sets)."""
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines() if line.startswith(prefix)
    )


def test_concurrent_requests_are_all_right_and_get_batched(
    server: str, fitted_detector: AnomalyDetector, test_paths: list[Path]
) -> None:
    paths = (test_paths * 3)[:32]
    expected = {p: r.score for p, r in zip(paths, fitted_detector.predict(paths), strict=True)}

    def inspect(path: Path) -> tuple[Path, float]:
        response = post_image(server, "inspect", path.read_bytes())
        assert response.status_code == 200, response.text
        return path, response.json()["score"]

    with ThreadPoolExecutor(max_workers=16) as pool:
        answers = list(pool.map(inspect, paths))
    assert len(answers) == len(paths)
    for path, score in answers:
        assert score == pytest.approx(expected[path], abs=1e-5)

    metrics = http_client.get(f"{server}/metrics", timeout=10).text
    batch_sizes = 'bentoml_service_adaptive_batch_size_{}{{method_name="score"'
    count = metric_sum(metrics, batch_sizes.format("count"))
    total = metric_sum(metrics, batch_sizes.format("sum"))
    assert count > 0, metrics
    assert total / count > 1.0, f"no batch larger than 1: {total} images in {count} batches"


def test_each_upload_is_scored_once_under_sustained_concurrency(server: str) -> None:
    """More requests than BentoML's inter-service client sends before replacing its
    connection pool (100 by default): a replacement cut the calls in flight, and the API's
    retry made the runner score those images twice."""
    scored = 'bentoml_service_adaptive_batch_size_sum{method_name="score"'
    # Camera-sized frames, so that most of each request is spent in the runner and many
    # runner calls are in flight whenever the pool would be replaced.
    rng = np.random.default_rng(3)
    frames = [
        png(Image.fromarray((carpet_texture(800, rng) * 255).astype(np.uint8))) for _ in range(4)
    ]
    uploads = (frames * 33)[:130]
    before = http_client.get(f"{server}/metrics", timeout=10).text
    with ThreadPoolExecutor(max_workers=12) as pool:
        statuses = list(
            pool.map(lambda data: post_image(server, "inspect", data).status_code, uploads)
        )
    assert statuses == [200] * len(uploads)
    after = http_client.get(f"{server}/metrics", timeout=10).text
    answered = metric_sum(after, "inspection_verdicts_total") - metric_sum(
        before, "inspection_verdicts_total"
    )
    runner_images = metric_sum(after, scored) - metric_sum(before, scored)
    assert answered == len(uploads)
    assert runner_images == len(uploads), f"the runner scored {runner_images} images"


def _animated(fmt: str) -> bytes:
    frames = [Image.new("RGB", (32, 32), (60 * i, 0, 0)) for i in range(3)]
    buffer = io.BytesIO()
    frames[0].save(buffer, format=fmt, save_all=True, append_images=frames[1:])
    return buffer.getvalue()


def _flip_middle(data: bytes, count: int = 64) -> bytes:
    """Same length and a valid header, but compressed pixel data that fails its checks."""
    middle = len(data) // 2
    return (
        data[:middle]
        + bytes(b ^ 0xFF for b in data[middle : middle + count])
        + data[middle + count :]
    )


def _refused_uploads() -> dict[str, tuple[bytes, int, str]]:
    good = png(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)))
    noise = np.random.default_rng(1).integers(0, 255, (700, 700, 3), np.uint8)
    return {
        "empty": (b"", 400, "empty"),
        "text": (b"hello, this is not an image", 415, "not_an_image"),
        "truncated": (good[: len(good) // 2], 400, "corrupt"),
        "corrupt": (_flip_middle(good), 400, "corrupt"),
        "animated": (_animated("WEBP"), 415, "animated"),
        "gif": (_animated("GIF"), 415, "not_an_image"),  # not one of the five formats
        "bomb": (png(Image.new("L", (12000, 12000))), 413, "too_many_pixels"),
        "oversize": (png(Image.fromarray(noise)), 413, "too_large"),
    }


def _converted_uploads() -> dict[str, bytes]:
    rgb = Image.fromarray(np.random.default_rng(2).integers(0, 255, (48, 64, 3), np.uint8))
    sixteen = Image.fromarray(np.linspace(0, 65535, 48 * 64).reshape(48, 64).astype(np.uint16))
    return {
        "grayscale": png(rgb.convert("L")),
        "rgba": png(rgb.convert("RGBA")),
        "cmyk_jpeg": png(rgb.convert("CMYK"), "JPEG"),
        "palette": png(rgb.convert("P")),
        "16bit": png(sixteen),
        "bmp": png(rgb, "BMP"),
    }


@pytest.mark.parametrize("kind", sorted(_refused_uploads()))
def test_bad_uploads_get_a_4xx_json_error_and_the_server_stays_up(
    server: str, test_paths: list[Path], kind: str
) -> None:
    data, status, reason = _refused_uploads()[kind]
    for endpoint in ("inspect", "heatmap"):
        response = post_image(server, endpoint, data)
        assert response.status_code == status, response.text
        assert response.json()["reason"] == reason and response.json()["error"]
    assert post_image(server, "inspect", test_paths[0].read_bytes()).status_code == 200


@pytest.mark.parametrize("kind", sorted(_converted_uploads()))
def test_convertible_images_are_scored(server: str, kind: str) -> None:
    response = post_image(server, "inspect", _converted_uploads()[kind])
    assert response.status_code == 200, response.text
    assert response.json()["image_width"] == 64 and response.json()["image_height"] == 48


def test_missing_upload_field_is_a_400(server: str) -> None:
    response = http_client.post(f"{server}/inspect", files={"other": ("x", b"1")}, timeout=30)
    assert response.status_code == 400


def test_metrics_expose_custom_series(server: str, test_paths: list[Path]) -> None:
    post_image(server, "inspect", test_paths[0].read_bytes())
    post_image(server, "inspect", b"garbage")
    metrics = http_client.get(f"{server}/metrics", timeout=10).text
    assert "inspection_normalized_score_bucket" in metrics
    assert 'inspection_verdicts_total{product="carpet",verdict="' in metrics
    assert 'inspection_rejected_inputs_total{reason="not_an_image"}' in metrics
    info = [line for line in metrics.splitlines() if line.startswith("inspection_model_info{")]
    assert info and 'category="carpet"' in info[0] and info[0].endswith(" 1.0")


def test_model_info_endpoint(server: str) -> None:
    info = http_client.post(f"{server}/model_info", timeout=30).json()
    assert info["category"] == "carpet" and info["extractor"]["resolution"] == 128
    # The runner runs the trace export stored (its scores equal in-process predict's, above).
    assert info["runtime"] == "torch" and info["backbone_trace"] is True
