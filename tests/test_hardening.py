"""The API as an attacker and an overloaded line meet it, on a real `bentoml serve`:
key and size checked before the body is read, file uploads only, caps, overload answers,
bounded heatmaps, and fuzzed images that never reach a 5xx."""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from detector.data.synthetic import carpet_texture
from devtools.http_client import http_client
from devtools.local_server import bentoml_serve, service_rss_mib

KEY = "k3y-for-the-hardening-tests"
AUTH = {"X-API-Key": KEY}
GIB = 1 << 30


@pytest.fixture(scope="module")
def server(store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("logs") / "serve.log"
    settings = {
        "INSPECT_API_KEY": KEY,
        "INSPECT_MAX_QUEUE": "4",
        "INSPECT_MAX_BATCH_FILES": "4",
        "INSPECT_MAX_BATCH_BYTES": "400000",
        "INSPECT_MAX_PIXELS": "45000000",  # above the 40 MP default: the overlay must use it
        "INSPECT_HEATMAP_MAX_SIDE": "64",
        # /drift is answered from the runner's latest answer while it is this recent: on a
        # loaded CI machine a second can pass between the last inspection and /drift.
        "INSPECT_BANK_REFRESH_S": "60",
    }
    with bentoml_serve(store, log, **settings) as url:
        yield url


def png(array: np.ndarray, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, **options)
    return buffer.getvalue()


def texture(size: int, seed: int = 0) -> np.ndarray:
    return (carpet_texture(size, np.random.default_rng(seed)) * 255).astype(np.uint8)


def post(url: str, endpoint: str, data: bytes, headers=AUTH, **fields: str) -> httpx.Response:
    files = {"image": ("part.png", data, "image/png")}
    return http_client.post(
        f"{url}/{endpoint}", files=files, data=fields, headers=headers, timeout=120
    )


def api_rss(url: str) -> float:
    (rss,) = [mib for name, mib in service_rss_mib(url).items() if name.startswith("api ")]
    return rss


PREAMBLE = b'--x\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\n'


def gibibyte(chunk: int = 1 << 20) -> Iterator[bytes]:
    """A well-formed start of a multipart file upload, then a gibibyte of file content."""
    yield PREAMBLE
    block = b"\0" * chunk
    for _ in range(GIB // chunk):
        yield block


def test_a_gibibyte_upload_is_refused_before_it_is_read(server: str) -> None:
    before = api_rss(server)
    length = str(len(PREAMBLE) + GIB)
    declared = {"Content-Type": "multipart/form-data; boundary=x", "Content-Length": length}
    anonymous = http_client.post(
        f"{server}/inspect", content=gibibyte(), headers=declared, timeout=300
    )
    assert anonymous.status_code == 401
    keyed = http_client.post(
        f"{server}/inspect", content=gibibyte(), headers={**declared, **AUTH}, timeout=300
    )
    assert keyed.status_code == 413 and keyed.json()["reason"] == "too_large"
    # No Content-Length (chunked): counted as it streams, cut at the limit.
    chunked = {"Content-Type": "multipart/form-data; boundary=x", **AUTH}
    streamed = http_client.post(
        f"{server}/inspect", content=gibibyte(), headers=chunked, timeout=300
    )
    assert streamed.status_code == 413
    assert api_rss(server) - before < 64, service_rss_mib(server)


def test_only_file_uploads_are_accepted(server: str) -> None:
    text_field = http_client.post(
        f"{server}/inspect",
        data={"image": "http://127.0.0.1:1/part.png"},
        files={"unused": ("x.txt", b"x", "text/plain")},
        headers=AUTH,
        timeout=30,
    )
    assert text_field.status_code == 400 and text_field.json()["reason"] == "not_a_file"
    as_json = http_client.post(
        f"{server}/inspect", json={"image": "http://127.0.0.1:1/part.png"}, headers=AUTH
    )
    assert as_json.status_code == 415 and as_json.json()["reason"] == "not_multipart"


def test_batch_caps_on_files_and_bytes(server: str) -> None:
    small = png(texture(32))
    five = [("images", (f"{i}.png", small, "image/png")) for i in range(5)]
    too_many = http_client.post(f"{server}/inspect_batch", files=five, headers=AUTH, timeout=60)
    assert too_many.status_code == 413 and too_many.json()["reason"] == "too_many_files"
    noise = np.random.default_rng(0).integers(0, 255, (200, 200, 3), np.uint8)
    big = [("images", (f"{i}.png", png(noise), "image/png")) for i in range(4)]
    too_big = http_client.post(f"{server}/inspect_batch", files=big, headers=AUTH, timeout=60)
    assert too_big.status_code == 413 and too_big.json()["reason"] == "too_large"
    four = five[:4]
    assert http_client.post(
        f"{server}/inspect_batch", files=four, headers=AUTH, timeout=60
    ).is_success


def test_model_and_drift_endpoints_need_the_key_and_drift_needs_no_runner_call(
    server: str,
) -> None:
    for endpoint in ("model_info", "drift"):
        assert http_client.post(f"{server}/{endpoint}", json={}, timeout=30).status_code == 401
    info = http_client.post(f"{server}/model_info", json={}, headers=AUTH, timeout=30).json()
    assert "drift_reference" not in info and info["category"] == "carpet"
    before = http_client.post(f"{server}/drift", json={}, headers=AUTH, timeout=30).json()["images"]
    for seed in range(3):
        assert post(server, "inspect", png(texture(48, seed))).status_code == 200
    after = http_client.post(f"{server}/drift", json={"reference": True}, headers=AUTH).json()
    assert after["images"] == before + 3 and after["reference_profiles"]
    # /drift answered from the API: the runner saw no drift call to queue behind an image
    # (BentoML lists each runner endpoint's series at 0 until it is called).
    metrics = http_client.get(f"{server}/metrics", timeout=30).text
    runner_calls = [
        line
        for line in metrics.splitlines()
        if 'service_name="inspection_runner"' in line
        and 'endpoint="/drift' in line
        and float(line.rsplit(" ", 1)[1]) > 0
    ]
    assert runner_calls == [], runner_calls
    for open_endpoint in ("livez", "readyz", "metrics"):
        assert http_client.get(f"{server}/{open_endpoint}", timeout=30).status_code == 200


def test_overload_gets_503_with_retry_after_and_the_service_recovers(server: str) -> None:
    frame = png(texture(1000))  # 24 at once overflow a queue of 4
    start = threading.Barrier(24)  # all sent together: a loaded machine staggered 12 threads

    def one(_: int) -> httpx.Response:
        start.wait()
        return post(server, "inspect", frame)

    with ThreadPoolExecutor(max_workers=24) as pool:
        responses = list(pool.map(one, range(24)))
    statuses = sorted(response.status_code for response in responses)
    assert set(statuses) <= {200, 503}, statuses
    refused = [response for response in responses if response.status_code == 503]
    assert refused and all(r.headers["retry-after"].isdigit() for r in refused)
    assert statuses.count(200) >= 3
    assert all(r.json()["reason"] == "overloaded" for r in refused)
    time.sleep(0.5)
    assert post(server, "inspect", frame).status_code == 200


def test_heatmaps_are_capped_and_the_overlay_decode_uses_the_configured_limits(
    server: str,
) -> None:
    wide = png(texture(200)[:100])  # 200 x 100
    overlay = post(server, "heatmap", wide)
    with Image.open(io.BytesIO(overlay.content)) as picture:
        assert picture.size == (64, 32)
    raw = post(server, "heatmap", wide, output="npy")
    assert np.load(io.BytesIO(raw.content)).shape == (32, 64)
    # 41 MP: above the 40 MP default limit, below this server's 45 MP.
    huge = png(np.zeros((6500, 6310, 3), np.uint8), compress_level=1)
    answer = post(server, "heatmap", huge)
    assert answer.status_code == 200, answer.text
    with Image.open(io.BytesIO(answer.content)) as picture:
        assert max(picture.size) == 64


def mutated(data: bytes, rng: np.random.Generator) -> bytes:
    """Flip, insert or cut a few bytes past the signature: mostly headers or pixel data
    that no longer agree."""
    array = bytearray(data)
    for _ in range(int(rng.integers(1, 6))):
        position = int(rng.integers(8, len(array)))
        action = rng.integers(0, 3)
        if action == 0:
            array[position] = int(rng.integers(0, 256))
        elif action == 1:
            array[position:position] = bytes(rng.integers(0, 256, int(rng.integers(1, 9))).tolist())
        else:
            del array[position : position + int(rng.integers(1, 64))]
    return bytes(array)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "BMP", "TIFF", "WEBP"])
def test_fuzzed_images_get_200_or_4xx_and_the_server_stays_up(server: str, fmt: str) -> None:
    rng = np.random.default_rng(["PNG", "JPEG", "BMP", "TIFF", "WEBP"].index(fmt))
    original = png(texture(40), fmt)
    uploads = [mutated(original, rng) for _ in range(200)]

    # One client, as a camera station keeps one: a fresh httpx client per request costs the
    # test process 30 ms of certificate loading, more than the server's answer.
    with httpx.Client(base_url=server, headers=AUTH, timeout=120) as client:

        def status(data: bytes) -> int:
            files = {"image": ("part.png", data, "image/png")}
            return client.post("/inspect", files=files).status_code

        with ThreadPoolExecutor(max_workers=2) as pool:  # within the queue of 4
            statuses = list(pool.map(status, uploads))
    unexpected = sorted({s for s in statuses if not (s == 200 or 400 <= s < 500)})
    assert unexpected == [], f"{fmt}: {unexpected}"
    assert 400 in statuses or 415 in statuses  # the mutations did break files
    assert http_client.get(f"{server}/livez", timeout=10).status_code == 200
