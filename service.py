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
from detector.images import InvalidImageError, decode_image
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


# INSPECT_MAX_BATCH_SIZE=1 turns adaptive batching off (BentoML needs a maximum above 1).
BATCHING: dict[str, Any] = (
    {
        "batchable": True,
        "max_batch_size": SETTINGS.max_batch_size,
        "max_latency_ms": SETTINGS.max_latency_ms,
    }
    if SETTINGS.max_batch_size > 1
    else {"batchable": False}
)


@bentoml.service(name="inspection_runner", workers=1, traffic={"timeout": 300})
class InspectionRunner:
    """Scores batches of decoded images; adaptive batching groups concurrent requests."""

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

    @bentoml.api(**BATCHING)
    def score(self, images: list[np.ndarray]) -> list[dict[str, Any]]:
        pictures = [Image.fromarray(image) for image in images]
        return self._answers(self.detector.predict(pictures, with_maps=False), with_maps=False)

    @bentoml.api(**BATCHING)
    def score_with_maps(self, images: list[np.ndarray]) -> list[dict[str, Any]]:
        results = self.detector.predict([Image.fromarray(image) for image in images])
        return self._answers(results, with_maps=True)

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


ui_app = Starlette(routes=[Route("/", lambda request: HTMLResponse(PAGE))])


@bentoml.asgi_app(ui_app, path="/ui")
@bentoml.service(name="inspection_api", workers=1, traffic={"timeout": 300})
class InspectionAPI:
    """Public endpoints: /inspect, /heatmap, /inspect_batch, /model_info, the /ui page."""

    runner = bentoml.depends(InspectionRunner)

    def __init__(self) -> None:
        self._model_info: dict[str, Any] | None = None

    async def _score(self, method: str, images: list[Image.Image]) -> list[dict[str, Any]]:
        """Call the runner, retrying once when a pooled connection turns out to be dead.

        Images travel as uint8 arrays: BentoML would PNG-encode a PIL image on the way, about
        1 s for a 1024 px frame, where pickling an array costs milliseconds.

        BentoML's inter-service client keeps idle connections longer than the runner's
        server does (BentoML issue #4971), so a write can hit a closed socket. Scoring has
        no side effects, so one retry is safe.
        """
        call = getattr(self.runner.to_async, method)
        arrays = [np.asarray(image) for image in images]
        try:
            return await call(arrays)
        except aiohttp.ClientConnectionError as error:
            log.warning("runner connection dropped (%s); retrying once", error)
            return await call(arrays)

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

    def _decode(self, upload: Path) -> Image.Image:
        """Runs in a worker thread: decoding a camera frame takes tens of milliseconds."""
        size = upload.stat().st_size
        if size > SETTINGS.max_bytes:
            raise InvalidImageError(
                "too_large",
                f"The upload is {size} bytes; the limit is {SETTINGS.max_bytes} bytes.",
                status=413,
            )
        return decode_image(
            upload.read_bytes(), max_bytes=SETTINGS.max_bytes, max_pixels=SETTINGS.max_pixels
        )

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
            decoded = await anyio.to_thread.run_sync(self._decode, image)
        except InvalidImageError as error:
            return _error(ctx, error.status, error.reason, error.message)
        decoded_at = time.perf_counter()
        try:
            (result,) = await self._score("score", [decoded])
        except aiohttp.ClientConnectionError:
            return _error(ctx, 503, "runner_unavailable", RUNNER_DOWN)
        answer = await self._record(result, with_profile=drift_profile)
        answer["timing_ms"] = {
            "decode": round((decoded_at - started) * 1000, 2),
            "score": round((time.perf_counter() - decoded_at) * 1000, 2),
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
            decoded = await anyio.to_thread.run_sync(self._decode, image)
        except InvalidImageError as error:
            return _error(ctx, error.status, error.reason, error.message)
        try:
            (result,) = await self._score("score_with_maps", [decoded])
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
        picture = (
            overlay(decoded, anomaly_map, answer["threshold"])
            if output == "overlay"
            else map_to_png_image(anomaly_map, answer["threshold"])
        )
        buffer = io.BytesIO()
        # zlib level 1: 0.08 s instead of 0.5 s for a 1024 px overlay, ~18 % larger file.
        picture.save(buffer, format="PNG", compress_level=1)
        return Response(buffer.getvalue(), media_type="image/png", headers=headers)

    @bentoml.api
    async def inspect_batch(self, images: list[Path], ctx: bentoml.Context) -> list[dict[str, Any]]:
        """Several images -> one result each, in order; a bad image gets an error entry."""
        if denied := self._unauthorised(ctx):
            return denied
        answers: list[dict[str, Any] | None] = [None] * len(images)
        decoded: list[tuple[int, Image.Image]] = []
        for position, upload in enumerate(images):
            try:
                decoded.append((position, await anyio.to_thread.run_sync(self._decode, upload)))
            except InvalidImageError as error:
                telemetry.rejected_inputs.labels(error.reason).inc()
                answers[position] = {"error": error.message, "reason": error.reason}
        if decoded:
            try:
                results = await self._score("score", [image for _, image in decoded])
            except aiohttp.ClientConnectionError:
                return _error(ctx, 503, "runner_unavailable", RUNNER_DOWN)
            for (position, _), result in zip(decoded, results, strict=True):
                answers[position] = await self._record(result)
        return answers

    @bentoml.api(route="/model_info")
    async def model_info(self) -> dict[str, Any]:
        return await self._info()

    @bentoml.api(route="/drift")
    async def drift(self, reference: bool = False) -> dict[str, Any]:
        """Drift of recent traffic against the calibration images (see the gauge
        inspection_drift_statistic); `reference=true` adds the reference profiles."""
        return await self.runner.to_async.drift_status(reference=reference)
