"""What the public API service does, apart from its BentoML declarations in service.py.

It checks uploads, calls the runner, counts results in the metrics, and turns answers into
JSON and heatmap PNGs. Key, size and queue checks come earlier, in `gate.RequestGate`. Every
refusal here is an exception mapped in one place (`respond`) to the `{"error", "reason"}`
answer and its HTTP status.
"""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import numpy as np
from starlette.responses import JSONResponse, Response

from detector import schema
from detector.images import (
    InvalidImageError,
    check_image_header,
    decode_image,
)
from detector.reports.plots import map_to_png_image, overlay
from detector.serving import telemetry
from detector.serving.answers import (
    Refusal,
    refusal,
    refuse_explain_below_reviewer,
    refused_answer,
)
from detector.serving.product_endpoints import ProductEndpoints
from detector.serving.record_endpoints import RecordEndpoints, RenderCache
from detector.serving.records import Recorder
from detector.serving.settings import Settings

log = logging.getLogger("inspection")
HEATMAP_OUTPUTS = ("overlay", "map", "npy")
MODEL_INFO_TTL_S = 5.0


class InspectionEndpoints(ProductEndpoints, RecordEndpoints):
    """The endpoints' work; `runner` is the BentoML dependency on the scoring runner."""

    def __init__(self, runner: Any, settings: Settings, recorder: Recorder | None = None) -> None:
        # Whole before any request, in the API worker only: BentoML checks metadata against
        # a half-imported scipy.sparse while another thread imports scipy (a confidence
        # bound), a 500. 0.5 s once.
        import scipy.sparse  # noqa: F401

        self.runner = runner
        self.settings = settings
        self.recorder = recorder
        self._model_info: dict[str, Any] | None = None
        self._model_info_at = 0.0
        # Each product's drift status as of the runner's latest answer for it: /drift
        # answers from here while traffic keeps it fresh, never waiting behind an image on
        # the runner's one thread; older than the bank refresh interval (a threshold or bank
        # changed elsewhere, no traffic since), the runner is asked.
        self._drift: dict[str, dict[str, Any]] = {}
        self._drift_at: dict[str, float] = {}
        # The bank version that answered last for each product, and each product's drift
        # reference with the version it belongs to: a reference is asked for again only
        # when another version (a recalibration, a rollback) has answered since.
        self._banks: dict[str, str] = {}
        self._references: dict[str, tuple[str, list[list[float]]]] = {}
        self._renders = anyio.Semaphore(settings.max_renders)
        self._rendered = RenderCache()
        # Requests reach the runner in arrival order (the semaphore's waiters are a FIFO),
        # so an accepted request waits for the ones ahead of it only, which is what bounds
        # its latency to about INSPECT_MAX_QUEUE runner turns. One more slot than a batch,
        # so the next upload is already on its way while the runner computes.
        self._runner_slots = anyio.Semaphore(settings.max_batch_size + 1)

    # ----- the one exit for errors ---------------------------------------------------
    @staticmethod
    async def respond(ctx: Any, work: Awaitable[Any]) -> Any:
        """Await an endpoint's work; a refusal becomes its JSON error and HTTP status
        (`ctx` is BentoML's request context, None outside a BentoML API method)."""
        try:
            return await work
        except Exception as error:
            refused = refusal(error)
            telemetry.rejected_inputs.labels(refused.reason).inc()
            if ctx is not None:
                ctx.response.status_code = refused.status
            return JSONResponse(refused.body(), status_code=refused.status)

    # ----- checks --------------------------------------------------------------------
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
        self.check_header(data)
        return data

    def check_header(self, data: bytes) -> tuple[int, int]:
        """Format, size, pixel count and animation, from the header alone; the size."""
        return check_image_header(
            data, max_bytes=self.settings.max_bytes, max_pixels=self.settings.max_pixels
        )

    async def read_upload(self, upload: Path) -> bytes:
        return await anyio.to_thread.run_sync(self._read_upload, upload)

    # ----- the runner ----------------------------------------------------------------
    async def _score(
        self, method: str, uploads: list[tuple[str, bytes, bool]], watch: bool = True
    ) -> list[dict[str, Any]]:
        """Call the runner, retrying once when a pooled connection turns out to be dead.

        Uploads travel as (product, encoded bytes, explain) (pickled raw; a PIL image would be
        PNG-encoded on the way, about 1 s for a 1024 px frame) and the runner decodes them.

        BentoML's inter-service client keeps idle connections longer than the runner's
        server does (BentoML issue #4971), so a write can hit a closed socket. Scoring has
        no side effects, so one retry is safe.
        """
        # Unwatched (a load test): the runner's twin endpoint, which leaves the drift
        # window and the served-version marks alone.
        call = getattr(self.runner.to_async, method if watch else f"{method}_unwatched")
        async with self._runner_slots:
            try:
                answers = await call(uploads)
            except aiohttp.ClientConnectionError as error:
                log.warning("runner connection dropped (%s); retrying once", error)
                answers = await call(uploads)
        for answer in answers if watch else []:
            if "product" in answer:
                self._drift[answer["product"]] = answer.pop("drift")
                self._drift_at[answer["product"]] = time.monotonic()
                self._banks[answer["product"]] = answer["models"]["bank"]
        return answers

    async def _change(self, method: str, *args: Any) -> Any:
        """A bank change or listing on the runner; never retried (a change is not idempotent)."""
        answer = await getattr(self.runner.to_async, method)(*args)
        self._model_info = None
        self._drift_at.clear()  # a new version may state another promise: ask the runner
        return refused_answer(answer) if isinstance(answer, dict) else answer

    async def model_info(self) -> dict[str, Any]:
        """What is served, cached for a few seconds: the runner answers it between images."""
        if self._model_info is None or time.monotonic() - self._model_info_at > MODEL_INFO_TTL_S:
            info = refused_answer(await self.runner.to_async.model_info())
            reference = info.pop("drift_reference", None)
            drift = info.pop("drift", None)
            if drift is not None and info.get("product"):
                product, bank = info["product"], info["bank_model"]
                if product not in self._drift:
                    self._drift[product] = drift
                    self._drift_at[product] = time.monotonic()
                self._banks.setdefault(product, bank)
                self._references[product] = (bank, reference or [])
            self._model_info, self._model_info_at = info, time.monotonic()
        return self._model_info

    async def drift(self, product: str | None, reference: bool) -> dict[str, Any]:
        """Drift of the traffic the runner has scored for a product, as of its latest answer
        when that is recent; else (and for the reference) the runner is asked, so the
        promise stated here follows the live version within the bank refresh interval."""
        name = product or None
        if name is None:
            names = (await self.model_info()).get("products", [])
            name = names[0] if len(names) == 1 else None
        cached = self._references.get(name or "")
        age = time.monotonic() - self._drift_at.get(name or "", float("-inf"))
        fresh = name in self._drift and age <= self.settings.bank_refresh_s
        if fresh and (not reference or cached and cached[0] == self._banks[name]):
            status = {"product": name, **self._drift[name]}
            return {**status, "reference_profiles": cached[1]} if reference and cached else status
        status = refused_answer(await self.runner.to_async.drift(name or "", reference))
        kept = ("product", "reference_profiles")
        self._drift[status["product"]] = {k: v for k, v in status.items() if k not in kept}
        self._drift_at[status["product"]] = time.monotonic()
        self._banks[status["product"]] = status["bank"]
        if reference:
            self._references[status["product"]] = (status["bank"], status["reference_profiles"])
        return status

    def _answer(
        self,
        result: dict[str, Any],
        with_profile: bool,
        upload: bytes,
        who: str | None,
        started: float,
        load_test: bool = False,
    ) -> dict[str, Any]:
        """The client's answer for a scored image, counted in the metrics and recorded
        (its `record_id` names the record to review); a load test's only counted, apart.
        The drift profile (90 numbers only a client computing its own drift statistic
        needs) is included only on request."""
        if load_test:
            telemetry.load_test_answers.labels(result["product"]).inc()
        else:
            telemetry.count_answer(result["product"], result)
        answer = schema.answer(result, result["models"], result["random_weights"], result["demo"])
        answer["product"] = result["product"]
        if self.recorder is not None and not load_test:
            latency_ms = round((time.perf_counter() - started) * 1000, 2)
            record = {**answer, "settings_hash": result["settings_hash"]}
            answer["record_id"] = self.recorder.record(record, upload, latency_ms, who)
        if with_profile:
            answer["drift_profile"] = result.get("drift_profile")
        return answer

    # ----- endpoints -----------------------------------------------------------------
    async def inspect(
        self,
        image: Path,
        product: str,
        drift_profile: bool,
        who: str | None = None,
        load_test: bool = False,
        explain: bool = False,
        role: str | None = None,
    ) -> dict[str, Any]:
        started = time.perf_counter()
        refuse_explain_below_reviewer(explain, role)
        upload = await self.read_upload(image)
        read_at = time.perf_counter()
        (result,) = await self._score("score", [(product, upload, explain)], not load_test)
        result = refused_answer(result)
        answer = self._answer(result, drift_profile, upload, who, started, load_test)
        if explain:
            answer["explanation"] = result["explanation"]
        answer["timing_ms"] = {
            "read": round((read_at - started) * 1000, 2),
            "score": round((time.perf_counter() - read_at) * 1000, 2),  # decode included
            "total": round((time.perf_counter() - started) * 1000, 2),
        }
        return answer

    async def heatmap(
        self,
        image: Path,
        product: str,
        output: str,
        drift_profile: bool,
        who: str | None = None,
        load_test: bool = False,
        explain: bool = False,
        role: str | None = None,
    ) -> Response:
        started = time.perf_counter()
        if output not in HEATMAP_OUTPUTS:
            raise Refusal(400, "bad_output", "output must be one of overlay, map, npy.")
        refuse_explain_below_reviewer(explain, role)
        upload = await self.read_upload(image)
        uploads = [(product, upload, explain)]
        (result,) = await self._score("score_with_maps", uploads, watch=not load_test)
        result = refused_answer(result)
        anomaly_map = np.asarray(result.pop("anomaly_map"), dtype=np.float32)
        answer = self._answer(result, drift_profile, upload, who, started, load_test)
        answer["timing_ms"] = {"total": round((time.perf_counter() - started) * 1000, 2)}
        if explain:  # two small crops: a few kB in the header
            answer["explanation"] = result["explanation"]
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
        async with self._renders:  # each render holds a decoded image: bounded at once
            picture = await anyio.to_thread.run_sync(
                self._picture, upload, anomaly_map, answer["threshold"], output
            )
        return Response(picture, media_type="image/png", headers=headers_out)

    def _picture(
        self, upload: bytes, anomaly_map: np.ndarray, threshold: float, output: str
    ) -> bytes:
        """The heatmap PNG, in a worker thread, at the map's (capped) size. The overlay
        decodes the upload once more, with the service's limits, reduced while decoding
        where the format allows (JPEG): the runner's copy stays in the runner."""
        if output == "overlay":
            height, width = anomaly_map.shape
            image = decode_image(
                upload,
                max_bytes=self.settings.max_bytes,
                max_pixels=self.settings.max_pixels,
                reduce_to=(width, height),
            )
            picture = overlay(image, anomaly_map, threshold)
        else:
            picture = map_to_png_image(anomaly_map, threshold)
        buffer = io.BytesIO()
        # zlib level 1: 0.08 s instead of 0.5 s for a 1024 px overlay, ~18 % larger file.
        picture.save(buffer, format="PNG", compress_level=1)
        return buffer.getvalue()

    async def inspect_batch(
        self, images: list[Path], product: str, who: str | None = None, load_test: bool = False
    ) -> list[dict[str, Any]]:
        """One answer per image, in order; a bad image gets its error in its place."""
        started = time.perf_counter()
        answers: list[dict[str, Any] | None] = [None] * len(images)
        readable: list[tuple[int, bytes]] = []
        for position, upload in enumerate(images):
            try:
                readable.append((position, await self.read_upload(upload)))
            except InvalidImageError as error:
                answers[position] = self._batch_error(error)
        pairs = [(product, data, False) for _, data in readable]
        results = await self._score("score", pairs, watch=not load_test) if readable else []
        for (position, data), result in zip(readable, results, strict=True):
            try:
                answers[position] = self._answer(
                    refused_answer(result), False, data, who, started, load_test
                )
            except Refusal as error:
                answers[position] = self._batch_error(error)
        return answers

    @staticmethod
    def _batch_error(error: Refusal | InvalidImageError) -> dict[str, str]:
        """One bad image in /inspect_batch: counted, and answered in its place."""
        refused = refusal(error)
        telemetry.rejected_inputs.labels(refused.reason).inc()
        return refused.body()
