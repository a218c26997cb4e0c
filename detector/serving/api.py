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
from collections import OrderedDict
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import numpy as np
from sqlalchemy.exc import SQLAlchemyError
from starlette.responses import JSONResponse, Response

from detector import schema
from detector.errors import UserError
from detector.images import (
    ALLOWED_FORMATS,
    InvalidImageError,
    check_image_header,
    decode_image,
)
from detector.records.store import RecordsError
from detector.reports.plots import map_to_png_image, overlay
from detector.serving import products, telemetry
from detector.serving.gate import CALLER_SCOPE_KEY, LOAD_TEST_SCOPE_KEY
from detector.serving.params import json_number, only_fields, real_number, whole_number
from detector.serving.records import Recorder
from detector.serving.settings import Settings

log = logging.getLogger("inspection")
RUNNER_DOWN = "The scoring runner is not reachable; retry shortly (see the server log)."
RECORDS_DOWN = "The records database is not reachable; retry shortly (see the server log)."
RECORDS_OFF = "Recording is off on this service (INSPECT_RECORDS=off)."
INTERNAL = "The service could not answer this request (the server log says why)."
HEATMAP_OUTPUTS = ("overlay", "map", "npy")
MODEL_INFO_TTL_S = 5.0


class Refused(Exception):
    """A request answered with an error instead of a result."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status, self.reason, self.message = status, reason, message

    @classmethod
    def of(cls, error: Exception) -> Refused:
        """The refusal an exception stands for: the one mapping from errors to answers.
        Whatever it does not know is a 500 with a sentence; the traceback goes to the log,
        never to the client."""
        if isinstance(error, Refused):
            return error
        if isinstance(error, InvalidImageError):
            return cls(error.status, error.reason, error.message)
        if isinstance(error, aiohttp.ClientConnectionError):
            return cls(503, "runner_unavailable", RUNNER_DOWN)
        if isinstance(error, RecordsError):
            return cls(error.status, error.reason, str(error))
        if isinstance(error, SQLAlchemyError):
            log.warning("records database error: %s", type(error).__name__)
            return cls(503, "records_unavailable", RECORDS_DOWN)
        if isinstance(error, products.UnknownProductError):
            if error.name is None:
                return cls(400, "product_required", str(error))
            return cls(404, "unknown_product", str(error))
        if isinstance(error, products.VersionError):
            return cls(404, "unknown_version", str(error))
        if isinstance(error, products.BankUnavailable):
            return cls(error.status, error.reason, str(error))
        if isinstance(error, UserError):
            return cls(400, "bad_request", str(error))
        log.error("unexpected error answering a request", exc_info=error)
        return cls(500, "internal_error", INTERNAL)


def current_endpoints() -> InspectionEndpoints:
    """The API service's endpoints, for the routes mounted beside it (/products, /records)."""
    import bentoml

    return bentoml.get_current_service().endpoints


async def as_response(work: Awaitable[Any]) -> Response:
    """A mounted route's answer: `respond`'s JSON error, the response it made, or JSON."""
    answer = await InspectionEndpoints.respond(None, work)
    return answer if isinstance(answer, Response) else JSONResponse(answer)


async def json_object(request: Any, usage: str) -> dict[str, Any]:
    """A mounted route's JSON body as an object; anything else is a 400 saying `usage`:
    text that is not JSON, nesting too deep to parse, or text no database can store (a
    lone UTF-16 surrogate)."""
    try:
        body = json.loads(await request.body() or b"{}")
        json.dumps(body, ensure_ascii=False).encode("utf-8")
    except (ValueError, RecursionError):  # UnicodeEncodeError is a ValueError
        raise Refused(400, "bad_json", usage) from None
    if not isinstance(body, dict):
        raise Refused(400, "bad_json", usage)
    return body


def caller(ctx: Any) -> str | None:
    """The name of the API key a request came with (set by the gate), for its record."""
    return ctx.request.scope.get(CALLER_SCOPE_KEY) if ctx is not None else None


def load_test(ctx: Any) -> bool:
    """Whether a load-test key sent the request (set by the gate): scored, never recorded,
    never in a drift window, counted apart."""
    return bool(ctx.request.scope.get(LOAD_TEST_SCOPE_KEY)) if ctx is not None else False


def refused_answer(runner_answer: dict[str, Any]) -> dict[str, Any]:
    """The runner's answer for one upload, or the refusal its decode raised."""
    if "error" in runner_answer:
        raise Refused(runner_answer["status"], runner_answer["reason"], runner_answer["error"])
    return runner_answer


def image_media_type(data: bytes) -> str:
    """The media type of a kept image, from its header (Pillow reads no pixels here)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS) as image:
            return Image.MIME.get(image.format or "", "application/octet-stream")
    except (UnidentifiedImageError, OSError):
        return "application/octet-stream"


class RenderCache:
    """Review heatmaps already drawn, by (image hash, bank version), up to `max_bytes`:
    a reviewer paging back and forth, or a client asking again and again, costs one
    redraw per image and version."""

    def __init__(self, max_bytes: int = 32 << 20) -> None:
        self.max_bytes, self.used = max_bytes, 0
        self._items: OrderedDict[tuple[str, str], tuple[bytes, dict[str, str]]] = OrderedDict()

    def get(self, key: tuple[str, str]) -> tuple[bytes, dict[str, str]] | None:
        item = self._items.get(key)
        if item is not None:
            self._items.move_to_end(key)
        return item

    def put(self, key: tuple[str, str], item: tuple[bytes, dict[str, str]]) -> None:
        if key in self._items or len(item[0]) > self.max_bytes:
            return
        self._items[key] = item
        self.used += len(item[0])
        while self.used > self.max_bytes:
            _, (picture, _) = self._items.popitem(last=False)
            self.used -= len(picture)


class InspectionEndpoints:
    """The endpoints' work; `runner` is the BentoML dependency on the scoring runner."""

    def __init__(self, runner: Any, settings: Settings, recorder: Recorder | None = None) -> None:
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
            refusal = Refused.of(error)
            telemetry.rejected_inputs.labels(refusal.reason).inc()
            if ctx is not None:
                ctx.response.status_code = refusal.status
            body = {"error": refusal.message, "reason": refusal.reason}
            return JSONResponse(body, status_code=refusal.status)

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
        self, method: str, uploads: list[tuple[str, bytes]], watch: bool = True
    ) -> list[dict[str, Any]]:
        """Call the runner, retrying once when a pooled connection turns out to be dead.

        Uploads travel as (product, encoded bytes) pairs (pickled raw; a PIL image would be
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

    # ----- products ------------------------------------------------------------------
    async def products(self) -> list[dict[str, Any]]:
        return await self._change("products")

    def served_product(self, name: str) -> str:
        """A product named in a path, checked as the runner checks a scored one: a valid
        name (400) of a product this service serves (404 otherwise, also for one in the
        store that INSPECT_PRODUCTS leaves out)."""
        products.check_product(name)
        known = self.settings.products or products.list_products()
        if name not in known:
            raise products.UnknownProductError(name, known)
        return name

    async def history(self, product: str, params: dict[str, str]) -> dict[str, Any]:
        """A page of a product's versions, newest last; `before=N` pages back. Read from
        the store here, in a worker thread: never on the runner, where it would wait
        behind images or hold them up."""
        name = self.served_product(product)
        limit = whole_number(params, "limit", 50, 1, 500)
        before = whole_number(params, "before", 0, 0, 10**9) or None
        versions = await anyio.to_thread.run_sync(products.history, name, limit + 1, before)
        more = len(versions) > limit
        versions = versions[1:] if more else versions
        next_before = int(versions[0]["version"][1:]) if more else None
        return {"product": name, "versions": versions, "next_before": next_before}

    async def rollback(self, product: str, version: str, reason: str) -> dict[str, Any]:
        if not version:
            raise Refused(400, "bad_request", "Name the version to restore (e.g. v2).")
        return await self._change("rollback", self.served_product(product), version, reason)

    async def set_threshold(self, product: str, change: dict[str, Any]) -> dict[str, Any]:
        only_fields(
            change,
            {"target", "threshold", "reason", "confirm", "from_reviews", "days"},
            "send target or threshold (and reason, confirm), or from_reviews: true.",
        )
        product = self.served_product(product)
        if change.get("from_reviews") is True:
            change = await self._from_reviews(product, change)
        elif "from_reviews" in change or "days" in change:
            raise Refused(400, "bad_request", "days goes with from_reviews: true.")
        return await self._change("set_threshold", product, change)

    async def _from_reviews(self, product: str, change: dict[str, Any]) -> dict[str, Any]:
        """The threshold suggestion, computed here from the records, sent to the runner with
        its defect-free scores: the version states the rate the suggestion stated."""
        if "threshold" in change or "confirm" in change:
            raise Refused(400, "bad_request", "from_reviews sets the threshold itself.")
        target = json_number(change, "target", None, 0.0, 0.5)
        days = json_number(change, "days", 7.0, 0.0, 3650.0)
        report = await anyio.to_thread.run_sync(
            lambda: self._recorder().suggestion(product, target, days, keep_scores=True)
        )
        if report["suggested"] is None:
            raise Refused(
                409, "no_reviews", f"No defect-free records of {product} to set a threshold from."
            )
        reviewed = {
            "threshold": report["suggested"]["threshold"],
            "target": report["target_false_alarm_rate"],
            "scores": report["defect_free_scores"],
        }
        reason = str(change.get("reason") or "suggested from reviewed records")
        return {"reviewed": reviewed, "reason": reason}

    async def add_images(
        self,
        product: str,
        images: list[bytes],
        reason: str,
        calibration: list[bytes],
        records: list[str] | None = None,
    ) -> dict[str, Any]:
        """Checked like scored uploads; any refused image refuses the whole change. The
        images of `records` (reviewed false alarms of this product) are added too, and each
        record then names the version it went into. One budget holds for the whole change,
        record images included: `INSPECT_MAX_CHANGE_BYTES` of encoded bytes and
        `INSPECT_MAX_CHANGE_PIXELS` of decoded pixels, checked from headers before the
        runner decodes anything."""
        product = self.served_product(product)
        records = list(dict.fromkeys(records or []))
        if len(records) > self.settings.max_batch_files:
            raise Refused(
                413, "too_many_files", f"At most {self.settings.max_batch_files} records at once."
            )
        budget = self.settings.max_change_bytes
        used = sum(len(data) for data in images + calibration)
        if used > budget:
            raise Refused(
                413, "too_large", f"The change holds {used} bytes; the limit is {budget}."
            )
        if records:
            recorder = self._recorder()
            images = images + await anyio.to_thread.run_sync(
                recorder.false_alarm_images, records, product, budget - used
            )
        if not images:
            raise Refused(
                400, "no_images", "Send at least one defect-free image as 'images' or 'records'."
            )
        pixels = 0
        for data in images + calibration:
            width, height = self.check_header(data)
            pixels += width * height
        if pixels > self.settings.max_change_pixels:
            raise Refused(
                413,
                "too_many_pixels",
                f"The change's images hold {pixels} pixels; the limit is "
                f"{self.settings.max_change_pixels} (INSPECT_MAX_CHANGE_PIXELS).",
            )
        async with self._runner_slots:
            report = await self._change("add_images", product, images, reason, calibration, records)
        if records:
            tag = f"{products.model_name(report['product'])}:{report['version']}"
            await anyio.to_thread.run_sync(self._recorder().mark_added, records, tag)
            report["records"] = records
        return report

    # ----- records -------------------------------------------------------------------
    def _recorder(self) -> Recorder:
        if self.recorder is None:
            raise Refused(404, "records_off", RECORDS_OFF)
        return self.recorder

    async def records(self, params: dict[str, str]) -> dict[str, Any]:
        return await anyio.to_thread.run_sync(self._recorder().list, params)

    async def review_summary(self) -> dict[str, Any]:
        return await anyio.to_thread.run_sync(self._recorder().summary)

    async def record(self, record_id: str) -> dict[str, Any]:
        return await anyio.to_thread.run_sync(self._recorder().get, record_id)

    async def record_image(self, record_id: str) -> Response:
        _, data = await anyio.to_thread.run_sync(self._recorder().image, record_id)
        return Response(data, media_type=image_media_type(data))

    async def record_heatmap(self, record_id: str) -> Response:
        """The overlay of a record's kept image, drawn by its product's live bank; the
        X-Bank-Model header says which version that was (the decision's is in the record).

        Drawn once per (image, bank version) and kept (`RenderCache`); the image is read
        only when the runner is ready for it, so waiting requests hold no image."""
        recorder = self._recorder()
        record = await anyio.to_thread.run_sync(recorder.get, record_id)
        bank = self._banks.get(record["product"])
        cached = self._rendered.get((record["image_sha256"], bank)) if bank else None
        hit = cached is not None
        if cached is None:
            async with self._runner_slots:
                _, data = await anyio.to_thread.run_sync(recorder.image, record_id)
                answer = await self.runner.to_async.redraw(record["product"], data)
            result = refused_answer(answer)
            anomaly_map = np.asarray(result["anomaly_map"], dtype=np.float32)
            async with self._renders:
                picture = await anyio.to_thread.run_sync(
                    self._picture, data, anomaly_map, result["threshold"], "overlay"
                )
            del data
            headers = {
                "X-Bank-Model": result["models"]["bank"],
                "X-Anomaly-Score": f"{result['score']:.8g}",
            }
            cached = (picture, headers)
            self._banks.setdefault(record["product"], headers["X-Bank-Model"])
            self._rendered.put((record["image_sha256"], headers["X-Bank-Model"]), cached)
        picture, headers = cached
        headers = {**headers, "X-Cache": "hit" if hit else "miss"}
        return Response(picture, media_type="image/png", headers=headers)

    async def suggestion(self, product: str, params: dict[str, str]) -> dict[str, Any]:
        """Rates at the live threshold and at one the reviewed records suggest."""
        name = self.served_product(product)
        target = real_number(params, "target", None, 0.0, 0.5)
        days = real_number(params, "days", 7.0, 0.0, 3650.0)
        recorder = self._recorder()
        return await anyio.to_thread.run_sync(recorder.suggestion, name, target, days)

    async def review(self, record_id: str, body: dict[str, Any], who: str | None) -> dict[str, Any]:
        """A reviewer's decision on a record; who reviewed is the key's name, never a name
        the body gives."""
        only_fields(
            body,
            {"label", "note"},
            'send {"label": ..., "note": ...}; the reviewer is the name of your key.',
        )
        label, note = body.get("label"), body.get("note")
        if not isinstance(label, str) or not isinstance(note, str | None):
            raise Refused(400, "bad_request", "label and note must be text.")
        recorder = self._recorder()
        return await anyio.to_thread.run_sync(recorder.review, record_id, label, note, who)

    # ----- endpoints -----------------------------------------------------------------
    async def inspect(
        self,
        image: Path,
        product: str,
        drift_profile: bool,
        who: str | None = None,
        load_test: bool = False,
    ) -> dict[str, Any]:
        started = time.perf_counter()
        upload = await self.read_upload(image)
        read_at = time.perf_counter()
        (result,) = await self._score("score", [(product, upload)], watch=not load_test)
        answer = self._answer(
            refused_answer(result), drift_profile, upload, who, started, load_test
        )
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
    ) -> Response:
        started = time.perf_counter()
        if output not in HEATMAP_OUTPUTS:
            raise Refused(400, "bad_output", "output must be one of overlay, map, npy.")
        upload = await self.read_upload(image)
        (result,) = await self._score("score_with_maps", [(product, upload)], watch=not load_test)
        result = refused_answer(result)
        anomaly_map = np.asarray(result.pop("anomaly_map"), dtype=np.float32)
        answer = self._answer(result, drift_profile, upload, who, started, load_test)
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
        pairs = [(product, data) for _, data in readable]
        results = await self._score("score", pairs, watch=not load_test) if readable else []
        for (position, data), result in zip(readable, results, strict=True):
            try:
                answers[position] = self._answer(
                    refused_answer(result), False, data, who, started, load_test
                )
            except Refused as error:
                answers[position] = self._batch_error(error)
        return answers

    @staticmethod
    def _batch_error(error: Refused | InvalidImageError) -> dict[str, str]:
        """One bad image in /inspect_batch: counted, and answered in its place."""
        refusal = Refused.of(error)
        telemetry.rejected_inputs.labels(refusal.reason).inc()
        return {"error": refusal.message, "reason": refusal.reason}
