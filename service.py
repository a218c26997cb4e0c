"""BentoML inspection service: a batching runner that scores images, behind an HTTP API.

    bentoml serve                      # http://localhost:3000, web page at /ui
    bentoml build && bentoml containerize inspection_api:latest

The runner (`InspectionRunner`) holds the backbone and memory bank from the model store and
scores batches through `detector.predictor.AnomalyDetector`, the same object the batch job
and the evaluator use. The API (`InspectionAPI`) validates uploads, calls the runner, and
turns results into JSON, heatmap PNGs and Prometheus metrics. Settings: detector/settings.py.
"""

from __future__ import annotations

import hmac
import io
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import bentoml
import numpy as np
from PIL import Image
from starlette.applications import Starlette
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from detector import telemetry
from detector.drift_statistics import DriftMonitor, profile_to_list
from detector.images import InvalidImageError, check_image_header, decode_image
from detector.settings import Settings
from detector.visualize import map_to_png_image, overlay  # imports matplotlib once, at start

log = logging.getLogger("inspection")
try:
    SETTINGS = Settings.from_env()
except ValueError as _bad_setting:
    raise SystemExit(f"error: an INSPECT_* setting is invalid: {_bad_setting}") from None
RUNNER_DOWN = "The scoring runner is not reachable; retry shortly (see the server log)."
PAGE = (Path(__file__).parent / "detector" / "static" / "index.html").read_text()


class ModelMissingError(RuntimeError):
    """A model named by the service is not in the BentoML model store."""


def _stored(reference: bentoml.models.BentoModel, variable: str) -> bentoml.Model:
    stored = reference.stored
    if stored is None:
        raise ModelMissingError(
            f"Model '{reference.tag}' is not in the BentoML model store: run "
            "`python -m detector.export <model_dir>` (after `python -m detector.fit`), or set "
            f"{variable} to a tag that `bentoml models list` shows."
        )
    return stored


def check_model_pair(backbone: bentoml.models.BentoModel, bank: bentoml.models.BentoModel) -> None:
    """Refuse to serve or build with a missing model or a bank fitted on another backbone.

    Runs when this module is imported, so `bentoml serve` and `bentoml build` stop at once
    with one sentence instead of a worker that fails and is restarted forever.
    """
    from detector.predictor import check_compatible

    backbone_info = _stored(backbone, "INSPECT_BACKBONE_MODEL").info.metadata
    bank_info = _stored(bank, "INSPECT_BANK_MODEL").info.metadata
    check_compatible(bank_info.get("extractor", {}), backbone_info)


BACKBONE_MODEL = bentoml.models.BentoModel(SETTINGS.backbone_tag)
BANK_MODEL = bentoml.models.BentoModel(SETTINGS.bank_tag)
try:
    check_model_pair(BACKBONE_MODEL, BANK_MODEL)
except (ModelMissingError, ValueError) as _refusal:
    raise SystemExit(f"error: {_refusal}") from None


# INSPECT_MAX_BATCH_SIZE=1 (the default on CPU, see detector/settings.py) turns adaptive
# batching off: BentoML needs a maximum above 1, and the runner then takes one call at a time.
BATCHING: dict[str, Any] = (
    {
        "batchable": True,
        "max_batch_size": SETTINGS.max_batch_size,
        "max_latency_ms": SETTINGS.max_latency_ms,
    }
    if SETTINGS.max_batch_size > 1
    else {"batchable": False}
)


@bentoml.service(
    name="inspection_runner",
    workers=1,
    traffic={"timeout": 300},
    # BentoML's inter-service client replaces its connection pool every 100 requests (or
    # 300 s) and closing the old pool cuts the calls still waiting on it; the API retries
    # them, so at 16 concurrent requests every refresh had the runner score ~15 images
    # twice (measured: docs/PERFORMANCE.md). A runner in the same bundle needs no refresh.
    runner_connection={"max_requests": 2**31 - 1, "max_age": 86400.0},
)
class InspectionRunner:
    """Decodes and scores uploads; with batching on, concurrent requests arrive as one batch.

    Uploads arrive as their encoded bytes and are decoded here, not in the API: on a CPU
    machine the API process competes with the ViT for the same cores, and every millisecond
    it spends decoding cost the runner about a millisecond (docs/PERFORMANCE.md). Decoding
    here also sends ~1 MB per image between the services instead of a 3 MB array.
    """

    backbone_model = BACKBONE_MODEL
    bank_model = BANK_MODEL

    def __init__(self) -> None:
        import faiss
        import torch

        from detector.cli import set_threads
        from detector.model_store import load_detector
        from detector.predictor import IncompatibleBankError

        set_threads(SETTINGS.num_threads)
        backbone_path = _stored(BACKBONE_MODEL, "INSPECT_BACKBONE_MODEL").path
        bank_path = _stored(BANK_MODEL, "INSPECT_BANK_MODEL").path
        try:
            self.detector = load_detector(
                backbone_path,
                bank_path,
                device=SETTINGS.device,
                half_precision=SETTINGS.half_precision,
                num_threads=SETTINGS.num_threads,
                batch_size=SETTINGS.max_batch_size,
            )
        except IncompatibleBankError as error:
            log.error("refusing to start: %s", error)
            raise
        log.info(
            "runner ready: device %s, torch threads %d, faiss threads %d, max batch %d",
            getattr(self.detector.extractor, "device", "?"),
            torch.get_num_threads(),
            faiss.omp_get_max_threads(),
            SETTINGS.max_batch_size,
        )
        bank = self.detector.bank.metadata
        self.info = {
            "backbone_model": str(BACKBONE_MODEL.stored.tag),
            "bank_model": str(BANK_MODEL.stored.tag),
            "category": bank.get("category", "unknown"),
            "random_weights": bool(getattr(self.detector.extractor, "random_weights", False)),
            "threshold": self.detector.calibration.threshold,
            "extractor": self.detector.extractor.spec,
        }
        telemetry.model_info.labels(
            self.info["backbone_model"],
            self.info["bank_model"],
            self.info["category"],
            str(self.info["random_weights"]).lower(),
        ).set(1)
        self.drift = DriftMonitor(
            np.asarray(self.detector.calibration.reference_profiles), SETTINGS.drift
        )
        if not self.drift.reference.size:
            log.warning(
                "the bank has no drift reference (fitted before drift monitoring existed): "
                "refit it, or set one with `python -m detector.drift_reference`"
            )
        self._publish_drift(self.drift.status())
        # Pillow's decoders and resize release the GIL: a batch's uploads decode in parallel.
        self.decoder = ThreadPoolExecutor(
            max_workers=SETTINGS.num_threads or 2, thread_name_prefix="decode"
        )

    @staticmethod
    def _publish_drift(status: dict[str, Any]) -> None:
        if status["statistic"] is not None:
            telemetry.drift_statistic().set(status["statistic"])
        telemetry.drift_window_images.set(status["images"])

    def _answers(self, results: list[Any], with_maps: bool) -> list[dict[str, Any]]:
        """Results as dicts, after adding every image to the drift window."""
        self._publish_drift(self.drift.add([r.drift_profile for r in results]))
        answers = []
        for result in results:
            answer = {**result.to_dict(), "drift_profile": profile_to_list(result.drift_profile)}
            if with_maps:
                answer["anomaly_map"] = result.anomaly_map
            answers.append(answer)
        return answers

    def __is_ready__(self) -> bool:
        return getattr(self, "detector", None) is not None

    def _prepare(self, upload: bytes) -> tuple[np.ndarray, tuple[int, int]] | InvalidImageError:
        """Decode and preprocess one upload; a bad one becomes its error, never the batch's."""
        try:
            image = decode_image(
                upload, max_bytes=SETTINGS.max_bytes, max_pixels=SETTINGS.max_pixels
            )
            return self.detector.prepare(image)
        except InvalidImageError as error:
            return error
        except Exception as error:  # a decoder bug on one upload must not fail its batch-mates
            log.warning("could not decode an upload: %r", error)
            return InvalidImageError("corrupt", f"The image could not be decoded: {error}")

    def _score_uploads(self, uploads: list[bytes], with_maps: bool) -> list[dict[str, Any]]:
        """One answer per upload, in order: a result, or {error, reason, status}."""
        prepared = list(self.decoder.map(self._prepare, uploads))
        good = [item for item in prepared if not isinstance(item, InvalidImageError)]
        answers = iter(())
        if good:
            arrays = np.stack([array for array, _ in good])
            results = self.detector.predict_prepared(arrays, [size for _, size in good], with_maps)
            answers = iter(self._answers(results, with_maps))
        return [
            {"error": item.message, "reason": item.reason, "status": item.status}
            if isinstance(item, InvalidImageError)
            else next(answers)
            for item in prepared
        ]

    @bentoml.api(**BATCHING)
    def score(self, uploads: list[bytes]) -> list[dict[str, Any]]:
        return self._score_uploads(uploads, with_maps=False)

    @bentoml.api(**BATCHING)
    def score_with_maps(self, uploads: list[bytes]) -> list[dict[str, Any]]:
        return self._score_uploads(uploads, with_maps=True)

    @bentoml.api
    def model_info(self) -> dict[str, Any]:
        return self.info

    @bentoml.api
    def drift_status(self, reference: bool = False) -> dict[str, Any]:
        """The drift window's state; with `reference`, the calibration profiles too."""
        status = self.drift.status()
        if reference:
            status["reference_profiles"] = self.drift.reference.tolist()
        return status


def _error(ctx: bentoml.Context, status: int, reason: str, message: str) -> JSONResponse:
    """A JSON error; BentoML takes the status of an API with a context from the context."""
    telemetry.rejected_inputs.labels(reason).inc()
    ctx.response.status_code = status
    return JSONResponse({"error": message, "reason": reason}, status_code=status)


def _batch_error(error: InvalidImageError) -> dict[str, str]:
    """One bad image in /inspect_batch: counted, and answered in its place."""
    telemetry.rejected_inputs.labels(error.reason).inc()
    return {"error": error.message, "reason": error.reason}


def _refused(answer: dict[str, Any]) -> dict[str, Any]:
    """The runner's answer for one upload, or the InvalidImageError its decode raised."""
    if "error" in answer:
        raise InvalidImageError(answer["reason"], answer["error"], status=answer["status"])
    return answer


ui_app = Starlette(routes=[Route("/", lambda request: HTMLResponse(PAGE))])


@bentoml.asgi_app(ui_app, path="/ui")
@bentoml.service(name="inspection_api", workers=1, traffic={"timeout": 300})
class InspectionAPI:
    """Public endpoints: /inspect, /heatmap, /inspect_batch, /model_info, the /ui page."""

    runner = bentoml.depends(InspectionRunner)

    def __init__(self) -> None:
        self._model_info: dict[str, Any] | None = None

    async def _score(self, method: str, uploads: list[bytes]) -> list[dict[str, Any]]:
        """Call the runner, retrying once when a pooled connection turns out to be dead.

        Uploads travel as their encoded bytes (pickled raw; a PIL image would be PNG-encoded
        on the way, about 1 s for a 1024 px frame) and the runner decodes them.

        BentoML's inter-service client keeps idle connections longer than the runner's
        server does (BentoML issue #4971), so a write can hit a closed socket. Scoring has
        no side effects, so one retry is safe.
        """
        call = getattr(self.runner.to_async, method)
        try:
            return await call(uploads)
        except aiohttp.ClientConnectionError as error:
            log.warning("runner connection dropped (%s); retrying once", error)
            return await call(uploads)

    async def _info(self) -> dict[str, Any]:
        if self._model_info is None:
            info = await self.runner.to_async.model_info()
            telemetry.model_info.labels(
                info["backbone_model"],
                info["bank_model"],
                info["category"],
                str(info["random_weights"]).lower(),
            ).set(1)
            self._model_info = info
        return self._model_info

    def _unauthorised(self, ctx: bentoml.Context) -> JSONResponse | None:
        if not SETTINGS.api_key:
            return None
        headers = ctx.request.headers
        given = headers.get("x-api-key") or headers.get("authorization", "").removeprefix("Bearer ")
        if hmac.compare_digest(given.encode(), SETTINGS.api_key.encode()):
            return None
        return _error(ctx, 401, "unauthorised", "Missing or wrong API key: send it as X-API-Key.")

    def _read_upload(self, upload: Path) -> bytes:
        """The upload's bytes, once the checks that need no pixel decoding pass.

        Runs in a worker thread (file I/O). Not an image, too large, too many pixels or
        animated: refused here without a trip to the runner; corrupt pixel data is found
        by the runner's decode and comes back as an error entry.
        """
        size = upload.stat().st_size
        if size > SETTINGS.max_bytes:
            raise InvalidImageError(
                "too_large",
                f"The upload is {size} bytes; the limit is {SETTINGS.max_bytes} bytes.",
                status=413,
            )
        data = upload.read_bytes()
        check_image_header(data, max_bytes=SETTINGS.max_bytes, max_pixels=SETTINGS.max_pixels)
        return data

    async def _record(self, result: dict[str, Any], with_profile: bool = False) -> dict[str, Any]:
        """Count the result in the metrics and add the model tags; the drift profile (90
        numbers only a client computing its own drift statistic needs) only on request."""
        telemetry.normalized_score.observe(result["normalized_score"])
        telemetry.verdicts.labels("anomalous" if result["is_anomalous"] else "normal").inc()
        info = await self._info()
        profile = result.pop("drift_profile", None)
        answer = {
            **result,
            "models": {"backbone": info["backbone_model"], "bank": info["bank_model"]},
            "random_weights": info["random_weights"],
        }
        if with_profile:
            answer["drift_profile"] = profile
        return answer

    @bentoml.api
    async def inspect(
        self, image: Path, ctx: bentoml.Context, drift_profile: bool = False
    ) -> dict[str, Any]:
        """One image -> score, threshold, normalised score, verdict, size, models, timing.

        `drift_profile=true` adds the image's patch-distance profile, for clients (the batch
        job with --url) that compute the drift statistic of their own run.
        """
        started = time.perf_counter()
        if denied := self._unauthorised(ctx):
            return denied
        try:
            upload = await anyio.to_thread.run_sync(self._read_upload, image)
            read_at = time.perf_counter()
            (answer,) = await self._score("score", [upload])
            result = _refused(answer)
        except InvalidImageError as error:
            return _error(ctx, error.status, error.reason, error.message)
        except aiohttp.ClientConnectionError:
            return _error(ctx, 503, "runner_unavailable", RUNNER_DOWN)
        answer = await self._record(result, with_profile=drift_profile)
        answer["timing_ms"] = {
            "read": round((read_at - started) * 1000, 2),
            "score": round((time.perf_counter() - read_at) * 1000, 2),  # decode included
            "total": round((time.perf_counter() - started) * 1000, 2),
        }
        return answer

    @bentoml.api
    async def heatmap(
        self,
        image: Path,
        ctx: bentoml.Context,
        output: str = "overlay",
        drift_profile: bool = False,
    ) -> Image.Image:
        """One image -> PNG: `overlay` (heatmap on the image), `map` (16-bit map), or `npy`.

        `map` scales the raw map by 2 x threshold to 0..65535; `npy` is the float32 map.
        The X-Inspection header carries the same JSON as /inspect, so a client (the web
        page) scores each image once.
        """
        started = time.perf_counter()
        if denied := self._unauthorised(ctx):
            return denied
        if output not in ("overlay", "map", "npy"):
            return _error(ctx, 400, "bad_output", "output must be one of overlay, map, npy.")
        try:
            upload = await anyio.to_thread.run_sync(self._read_upload, image)
            (answer,) = await self._score("score_with_maps", [upload])
            result = _refused(answer)
        except InvalidImageError as error:
            return _error(ctx, error.status, error.reason, error.message)
        except aiohttp.ClientConnectionError:
            return _error(ctx, 503, "runner_unavailable", RUNNER_DOWN)
        anomaly_map = np.asarray(result.pop("anomaly_map"), dtype=np.float32)
        answer = await self._record(result, with_profile=drift_profile)
        answer["timing_ms"] = {"total": round((time.perf_counter() - started) * 1000, 2)}
        headers = {
            "X-Anomaly-Score": f"{answer['score']:.8g}",
            "X-Threshold": f"{answer['threshold']:.8g}",
            "X-Is-Anomalous": str(answer["is_anomalous"]).lower(),
            "X-Inspection": json.dumps(answer),
        }
        if output == "npy":
            buffer = io.BytesIO()
            np.save(buffer, anomaly_map)
            return Response(buffer.getvalue(), media_type="application/x-npy", headers=headers)
        picture = await anyio.to_thread.run_sync(
            self._picture, upload, anomaly_map, answer["threshold"], output
        )
        return Response(picture, media_type="image/png", headers=headers)

    @staticmethod
    def _picture(upload: bytes, anomaly_map: np.ndarray, threshold: float, output: str) -> bytes:
        """The heatmap PNG, in a worker thread. The overlay decodes the upload once more
        (the runner's copy stays there): tens of milliseconds, for this endpoint only."""
        picture = (
            overlay(decode_image(upload), anomaly_map, threshold)
            if output == "overlay"
            else map_to_png_image(anomaly_map, threshold)
        )
        buffer = io.BytesIO()
        # zlib level 1: 0.08 s instead of 0.5 s for a 1024 px overlay, ~18 % larger file.
        picture.save(buffer, format="PNG", compress_level=1)
        return buffer.getvalue()

    @bentoml.api
    async def inspect_batch(self, images: list[Path], ctx: bentoml.Context) -> list[dict[str, Any]]:
        """Several images -> one result each, in order; a bad image gets an error entry."""
        if denied := self._unauthorised(ctx):
            return denied
        answers: list[dict[str, Any] | None] = [None] * len(images)
        readable: list[tuple[int, bytes]] = []
        for position, upload in enumerate(images):
            try:
                readable.append(
                    (position, await anyio.to_thread.run_sync(self._read_upload, upload))
                )
            except InvalidImageError as error:
                answers[position] = _batch_error(error)
        if readable:
            try:
                results = await self._score("score", [data for _, data in readable])
            except aiohttp.ClientConnectionError:
                return _error(ctx, 503, "runner_unavailable", RUNNER_DOWN)
            for (position, _), result in zip(readable, results, strict=True):
                try:
                    answers[position] = await self._record(_refused(result))
                except InvalidImageError as error:
                    answers[position] = _batch_error(error)
        return answers

    @bentoml.api(route="/model_info")
    async def model_info(self) -> dict[str, Any]:
        return await self._info()

    @bentoml.api(route="/drift")
    async def drift(self, reference: bool = False) -> dict[str, Any]:
        """Drift of recent traffic against the calibration images (see the gauge
        inspection_drift_statistic); `reference=true` adds the reference profiles."""
        return await self.runner.to_async.drift_status(reference=reference)
