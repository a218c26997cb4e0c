"""What the public API service does, apart from its BentoML declarations in service.py.

It checks the key and the uploads, calls the runner, counts results in the metrics, and
turns answers into JSON and heatmap PNGs. Every refusal is an exception mapped in one place
(`respond`) to the `{"error", "reason"}` answer and its HTTP status.
"""

from __future__ import annotations

import hmac
import io
import json
import logging
import time
from collections.abc import Awaitable, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import numpy as np
from starlette.responses import JSONResponse, Response

from detector import schema
from detector.images import InvalidImageError, check_image_header, decode_image
from detector.reports.plots import map_to_png_image, overlay
from detector.serving import telemetry
from detector.serving.settings import Settings

log = logging.getLogger("inspection")
RUNNER_DOWN = "The scoring runner is not reachable; retry shortly (see the server log)."
HEATMAP_OUTPUTS = ("overlay", "map", "npy")


class Refused(Exception):
    """A request answered with an error instead of a result."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status, self.reason, self.message = status, reason, message

    @classmethod
    def of(cls, error: Exception) -> Refused:
        """The refusal an exception stands for: the one mapping from errors to answers."""
        if isinstance(error, Refused):
            return error
        if isinstance(error, InvalidImageError):
            return cls(error.status, error.reason, error.message)
        if isinstance(error, aiohttp.ClientConnectionError):
            return cls(503, "runner_unavailable", RUNNER_DOWN)
        raise TypeError(f"{type(error).__name__} is not a refusal") from error


REFUSALS = (Refused, InvalidImageError, aiohttp.ClientConnectionError)


def refused_answer(runner_answer: dict[str, Any]) -> dict[str, Any]:
    """The runner's answer for one upload, or the refusal its decode raised."""
    if "error" in runner_answer:
        raise Refused(runner_answer["status"], runner_answer["reason"], runner_answer["error"])
    return runner_answer


class InspectionEndpoints:
    """The endpoints' work; `runner` is the BentoML dependency on the scoring runner."""

    def __init__(self, runner: Any, settings: Settings) -> None:
        self.runner = runner
        self.settings = settings
        self._model_info: dict[str, Any] | None = None

    # ----- the one exit for errors ---------------------------------------------------
    @staticmethod
    async def respond(ctx: Any, work: Awaitable[Any]) -> Any:
        """Await an endpoint's work; a refusal becomes its JSON error and HTTP status."""
        try:
            return await work
        except REFUSALS as error:
            refusal = Refused.of(error)
            telemetry.rejected_inputs.labels(refusal.reason).inc()
            ctx.response.status_code = refusal.status
            body = {"error": refusal.message, "reason": refusal.reason}
            return JSONResponse(body, status_code=refusal.status)

    # ----- checks --------------------------------------------------------------------
    def authorise(self, headers: Mapping[str, str]) -> None:
        if not self.settings.api_key:
            return
        given = headers.get("x-api-key") or headers.get("authorization", "").removeprefix("Bearer ")
        if not hmac.compare_digest(given.encode(), self.settings.api_key.encode()):
            raise Refused(401, "unauthorised", "Missing or wrong API key: send it as X-API-Key.")

    def _read_upload(self, upload: Path) -> bytes:
        """The upload's bytes, once the checks that need no pixel decoding pass.

        Runs in a worker thread (file I/O). Not an image, too large, too many pixels or
        animated: refused here without a trip to the runner; corrupt pixel data is found
        by the runner's decode and comes back as an error entry.
        """
        size = upload.stat().st_size
        if size > self.settings.max_bytes:
            raise InvalidImageError(
                "too_large",
                f"The upload is {size} bytes; the limit is {self.settings.max_bytes} bytes.",
                status=413,
            )
        data = upload.read_bytes()
        limits = {"max_bytes": self.settings.max_bytes, "max_pixels": self.settings.max_pixels}
        check_image_header(data, **limits)
        return data

    async def read_upload(self, upload: Path) -> bytes:
        return await anyio.to_thread.run_sync(self._read_upload, upload)

    # ----- the runner ----------------------------------------------------------------
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

    async def model_info(self) -> dict[str, Any]:
        if self._model_info is None:
            info = await self.runner.to_async.model_info()
            telemetry.publish_model_info(info)
            self._model_info = info
        return self._model_info

    async def drift(self, reference: bool) -> dict[str, Any]:
        return await self.runner.to_async.drift_status(reference=reference)

    async def _answer(self, result: dict[str, Any], with_profile: bool) -> dict[str, Any]:
        """The client's answer for a scored image, counted in the metrics. The drift
        profile (90 numbers only a client computing its own drift statistic needs) is
        included only on request."""
        telemetry.count_answer(result)
        info = await self.model_info()
        models = {"backbone": info["backbone_model"], "bank": info["bank_model"]}
        answer = schema.answer(result, models, info["random_weights"])
        if with_profile:
            answer["drift_profile"] = result.get("drift_profile")
        return answer

    # ----- endpoints -----------------------------------------------------------------
    async def inspect(
        self, image: Path, headers: Mapping[str, str], drift_profile: bool
    ) -> dict[str, Any]:
        started = time.perf_counter()
        self.authorise(headers)
        upload = await self.read_upload(image)
        read_at = time.perf_counter()
        (result,) = await self._score("score", [upload])
        answer = await self._answer(refused_answer(result), drift_profile)
        answer["timing_ms"] = {
            "read": round((read_at - started) * 1000, 2),
            "score": round((time.perf_counter() - read_at) * 1000, 2),  # decode included
            "total": round((time.perf_counter() - started) * 1000, 2),
        }
        return answer

    async def heatmap(
        self, image: Path, headers: Mapping[str, str], output: str, drift_profile: bool
    ) -> Response:
        started = time.perf_counter()
        self.authorise(headers)
        if output not in HEATMAP_OUTPUTS:
            raise Refused(400, "bad_output", "output must be one of overlay, map, npy.")
        upload = await self.read_upload(image)
        (result,) = await self._score("score_with_maps", [upload])
        result = refused_answer(result)
        anomaly_map = np.asarray(result.pop("anomaly_map"), dtype=np.float32)
        answer = await self._answer(result, drift_profile)
        answer["timing_ms"] = {"total": round((time.perf_counter() - started) * 1000, 2)}
        headers_out = {
            "X-Anomaly-Score": f"{answer['score']:.8g}",
            "X-Threshold": f"{answer['threshold']:.8g}",
            "X-Is-Anomalous": str(answer["is_anomalous"]).lower(),
            "X-Inspection": json.dumps(answer),
        }
        if output == "npy":
            buffer = io.BytesIO()
            np.save(buffer, anomaly_map)
            return Response(buffer.getvalue(), media_type="application/x-npy", headers=headers_out)
        picture = await anyio.to_thread.run_sync(
            self._picture, upload, anomaly_map, answer["threshold"], output
        )
        return Response(picture, media_type="image/png", headers=headers_out)

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

    async def inspect_batch(
        self, images: list[Path], headers: Mapping[str, str]
    ) -> list[dict[str, Any]]:
        """One answer per image, in order; a bad image gets its error in its place."""
        self.authorise(headers)
        answers: list[dict[str, Any] | None] = [None] * len(images)
        readable: list[tuple[int, bytes]] = []
        for position, upload in enumerate(images):
            try:
                readable.append((position, await self.read_upload(upload)))
            except InvalidImageError as error:
                answers[position] = self._batch_error(error)
        results = await self._score("score", [data for _, data in readable]) if readable else []
        for (position, _), result in zip(readable, results, strict=True):
            try:
                answers[position] = await self._answer(refused_answer(result), False)
            except Refused as error:
                answers[position] = self._batch_error(error)
        return answers

    @staticmethod
    def _batch_error(error: Refused | InvalidImageError) -> dict[str, str]:
        """One bad image in /inspect_batch: counted, and answered in its place."""
        refusal = Refused.of(error)
        telemetry.rejected_inputs.labels(refusal.reason).inc()
        return {"error": refusal.message, "reason": refusal.reason}
