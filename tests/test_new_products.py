"""New products fitted by the runner as background jobs (detector/serving/fit_jobs.py),
in-process: progress, the version it ends as, cancel, one fit at a time, and refusals that
leave nothing in the store. The same over HTTP and from the page: tests/test_products.py."""

from __future__ import annotations

import dataclasses
import io
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from detector.anomaly_detector import AnomalyDetector
from detector.banks import products, versions
from detector.banks.models import save_backbone
from detector.data.mvtec import MVTecCategory
from detector.dino import DinoBackbone
from detector.fitting import fit_detector
from detector.scoring import ScoringConfig
from detector.serving.fit_requests import FitRequest
from detector.serving.runner import ScoringRunner
from detector.serving.settings import Settings


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


class PausedExtractor:
    """The real extractor, whose backbone passes wait while `paused` is clear: a fit held
    mid-way, as a slow one would be."""

    def __init__(self, extractor: DinoBackbone) -> None:
        self._extractor = extractor
        self.paused = threading.Event()
        self.waiting = threading.Event()
        self.paused.set()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._extractor, name)

    def embed(self, batch: np.ndarray) -> np.ndarray:
        self.policy = os.sched_getscheduler(0)  # the calling thread's scheduling policy
        if not self.paused.is_set():
            self.waiting.set()
            self.paused.wait(30)
        return self._extractor.embed(batch)


@pytest.fixture(scope="module")
def backbone_tag(tiny_backbone: DinoBackbone) -> str:
    return str(save_backbone(tiny_backbone, "dino-backbone", with_graph=False).tag)


@pytest.fixture
def runner(tiny_backbone: DinoBackbone, backbone_tag: str) -> Iterator[ScoringRunner]:
    settings = dataclasses.replace(Settings.from_env(), products=[], max_batch_size=4)
    runner = ScoringRunner(PausedExtractor(tiny_backbone), backbone_tag, [], settings)
    yield runner
    runner.fits.stop()


@pytest.fixture(scope="module")
def uploads(synthetic_dataset: MVTecCategory) -> list[bytes]:
    return [path.read_bytes() for path in synthetic_dataset.train_paths()[:12]]


def finished(runner: ScoringRunner, product: str, job: str) -> dict[str, Any]:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        state = runner.fit_job(product, job, cancel=False)
        if state["state"] in ("done", "failed", "cancelled"):
            return state
        time.sleep(0.02)
    raise AssertionError(f"the fit job never finished: {state}")


def test_a_fit_job_ends_as_v1_live_and_scores_like_the_same_fit_in_process(
    runner: ScoringRunner, uploads: list[bytes], tiny_backbone: DinoBackbone
) -> None:
    sessions = ["day"] * 6 + ["night"] * 6
    request = FitRequest("nf-fresh", uploads, sessions, target=0.05, requested_by="admin")
    first = runner.start_fit(request)
    assert first["state"] == "running" and first["images"] == 12 and first["version"] is None
    state = finished(runner, "nf-fresh", first["job"])
    assert state["state"] == "done" and state["version"] == "v1", state
    assert state["progress"] == 1.0 and state["failure"] is None
    assert set(state["stage_seconds"]) == {"decoding", "features", "crops", "folds", "saving"}
    assert sum(state["stage_seconds"].values()) <= state["seconds"] + 0.01
    # The promise it states is the one /products states: leave one session out.
    assert state["calibration"]["source"] == "leave_one_session_out"
    assert state["calibration"]["sessions"] == 2
    model = products.live_model("nf-fresh")
    change = model.info.metadata["change"]
    assert change["action"] == "fit" and change["source"] == "http"
    assert change["sessions"] == ["day", "night"] and change["requested_by"] == "admin"
    assert versions.describe(model)["calibration"] == state["calibration"]
    # The same images fitted in-process give the same bank, threshold and scores.
    decoded = [Image.open(io.BytesIO(data)).convert("RGB") for data in uploads]
    expected = fit_detector(
        tiny_backbone,
        decoded,
        sessions=sessions,
        scoring=ScoringConfig(false_alarm_rate=0.05),
        progress=False,
        batch_size=4,
    )
    served = AnomalyDetector.from_bank(versions.load_bank(model), tiny_backbone)
    assert served.bank.size == expected.bank.size
    assert served.calibration.threshold == pytest.approx(expected.calibration.threshold)
    (answer,) = runner.score_uploads([("nf-fresh", uploads[0])], with_maps=False)
    (direct,) = expected.predict([decoded[0]], with_maps=False)
    assert answer["score"] == pytest.approx(direct.score, abs=1e-6)
    assert answer["models"]["bank"] == "bank-nf-fresh:v1"
    again = runner.start_fit(FitRequest("nf-fresh", uploads, []))
    assert again["status"] == 409 and again["reason"] == "product_exists"


def test_a_cancelled_fit_saves_nothing_and_the_name_stays_free(
    runner: ScoringRunner, uploads: list[bytes]
) -> None:
    extractor = runner.catalog.extractor
    extractor.paused.clear()
    job = runner.start_fit(FitRequest("nf-cancel", uploads, []))["job"]
    assert extractor.waiting.wait(30), "the fit reached the backbone"
    assert extractor.policy == os.SCHED_IDLE, "a fit runs only on cores scoring leaves idle"
    # One fit at a time: another is refused with a time to retry.
    busy = runner.start_fit(FitRequest("nf-other", uploads, []))
    assert busy["status"] == 503 and busy["reason"] == "fit_busy" and busy["retry_after"] >= 1
    cancelled = runner.fit_job("nf-cancel", job, cancel=True)
    assert cancelled["cancel_requested"] is True
    extractor.paused.set()
    state = finished(runner, "nf-cancel", job)
    assert state["state"] == "cancelled" and state["version"] is None
    assert "nf-cancel" not in products.list_products()
    assert not products.product_dir("nf-cancel").exists() or not products.version_numbers(
        "nf-cancel"
    )
    # Cancelling a finished job says what happened; the name can be fitted now.
    done = finished(
        runner, "nf-cancel", runner.start_fit(FitRequest("nf-cancel", uploads, []))["job"]
    )
    assert done["state"] == "done" and done["version"] == "v1"
    late = runner.fit_job("nf-cancel", done["job"], cancel=True)
    assert late["status"] == 409 and "v1 is live" in late["error"]
    unknown = runner.fit_job("nf-cancel", "0123456789ab", cancel=False)
    assert unknown["status"] == 404 and "restart" in unknown["error"]


@pytest.mark.parametrize(
    "case",
    ["no_images", "one_image", "mixed_sizes", "bad_name", "bad_sessions", "bad_target", "corrupt"],
)
def test_bad_fit_requests_are_one_sentence_and_leave_nothing(
    runner: ScoringRunner, uploads: list[bytes], case: str
) -> None:
    name = "nf-bad"
    images, sessions, target = list(uploads), [], 0.01
    if case == "no_images":
        images = []
    elif case == "one_image":
        images = images[:1]
    elif case == "mixed_sizes":
        images[3] = png(Image.open(io.BytesIO(images[3])).resize((40, 30)))
    elif case == "bad_name":
        name = "Bad Name"
    elif case == "bad_sessions":
        sessions = ["day"] * 5
    elif case == "bad_target":
        target = 0.9
    elif case == "corrupt":  # a sound header, then garbage: found when the fit decodes it
        images[5] = images[5][:200] + bytes(len(images[5]) - 200)
    answer = runner.start_fit(FitRequest(name, images, sessions, target=target))
    if case == "corrupt":
        state = finished(runner, name, answer["job"])
        assert state["state"] == "failed" and state["failure"].startswith("Image 6:"), state
    else:
        assert answer["status"] == 400 and answer["error"], answer
        expected = {
            "one_image": "at least 5",
            "no_images": "at least 5",
            "mixed_sizes": "40 x 30 (1)",
            "bad_sessions": "5 sessions for 12 images",
        }.get(case, "")
        assert expected in answer["error"]
    assert "nf-bad" not in products.list_products()


def test_a_server_pinned_to_its_products_fits_no_new_one(
    tiny_backbone: DinoBackbone, backbone_tag: str, uploads: list[bytes], tmp_path: Path
) -> None:
    settings = dataclasses.replace(Settings.from_env(), products=["carpet"], max_batch_size=4)
    runner = ScoringRunner(tiny_backbone, backbone_tag, [], settings)
    answer = runner.start_fit(FitRequest("nf-pinned", uploads, []))
    assert answer["status"] == 409 and "INSPECT_PRODUCTS" in answer["error"]


def test_a_stopping_server_cancels_its_fit_and_saves_nothing(
    runner: ScoringRunner, uploads: list[bytes]
) -> None:
    """What the runner's shutdown hook does when SIGTERM comes mid-fit."""
    extractor = runner.catalog.extractor
    extractor.paused.clear()
    job = runner.start_fit(FitRequest("nf-stopped", uploads, []))["job"]
    assert extractor.waiting.wait(30)
    stopping = threading.Thread(target=runner.fits.stop)
    stopping.start()
    time.sleep(0.1)
    extractor.paused.set()
    stopping.join(30)
    assert runner.fit_job("nf-stopped", job, cancel=False)["state"] == "cancelled"
    assert "nf-stopped" not in products.list_products()
