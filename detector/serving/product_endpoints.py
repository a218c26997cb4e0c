"""The API's product endpoints: list, history, rollback, the operating point, images added
to a bank. Bank changes run on the runner (`_change`), one at a time with images; history
is read here, in a worker thread."""

from __future__ import annotations

from typing import Any

import anyio

from detector.banks import products, versions
from detector.serving.answers import Refusal, refused_answer
from detector.serving.params import json_number, only_fields, real_number, whole_number
from detector.serving.records import Recorder
from detector.serving.settings import Settings
from detector.sessions import check_join, check_session_name


class ProductEndpoints:
    """A part of `InspectionEndpoints` (detector/serving/api.py)."""

    # Set by InspectionEndpoints, which also gives `_change` (a call to the runner),
    # `check_header` and `_picture`.
    runner: Any
    settings: Settings
    recorder: Recorder | None
    _runner_slots: anyio.Semaphore

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
        page = await anyio.to_thread.run_sync(versions.history, name, limit + 1, before)
        more = len(page) > limit
        page = page[1:] if more else page
        next_before = int(page[0]["version"][1:]) if more else None
        return {"product": name, "versions": page, "next_before": next_before}

    # Each change names who made it (`by`: the name of the key, never one the body gives):
    # the product's history says it beside what changed, why and when.
    async def rollback(
        self, product: str, version: str, reason: str, by: str | None = None
    ) -> dict[str, Any]:
        if not version:
            raise Refusal(400, "bad_request", "Name the version to restore (e.g. v2).")
        return await self._change("rollback", self.served_product(product), version, reason, by)

    async def set_threshold(
        self, product: str, change: dict[str, Any], by: str | None = None
    ) -> dict[str, Any]:
        only_fields(
            change,
            {"target", "threshold", "reason", "confirm", "from_reviews", "days"},
            "send target or threshold (and reason, confirm), or from_reviews: true.",
        )
        product = self.served_product(product)
        if change.get("from_reviews") is True:
            change = await self._from_reviews(product, change)
        elif "from_reviews" in change or "days" in change:
            raise Refusal(400, "bad_request", "days goes with from_reviews: true.")
        return await self._change("set_threshold", product, change, by)

    async def set_mask(
        self, product: str, mask: bytes | None, reason: str, by: str | None = None
    ) -> dict[str, Any]:
        """A new version inspecting only where `mask` is white (None: everywhere); the
        runner decodes it with the service's image limits."""
        return await self._change("set_mask", self.served_product(product), mask, reason, by)

    async def _from_reviews(self, product: str, change: dict[str, Any]) -> dict[str, Any]:
        """The threshold suggestion, computed here from the records, sent to the runner with
        its defect-free scores: the version states the rate the suggestion stated."""
        if "threshold" in change or "confirm" in change:
            raise Refusal(400, "bad_request", "from_reviews sets the threshold itself.")
        target = json_number(change, "target", None, 0.0, 0.5)
        days = json_number(change, "days", 7.0, 0.0, 3650.0)
        report = await anyio.to_thread.run_sync(
            lambda: self._recorder().suggestion(product, target, days, keep_scores=True)
        )
        if report["suggested"] is None:
            raise Refusal(
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
        session: str | None = None,
        join: str = "both",
        by: str | None = None,
    ) -> dict[str, Any]:
        """Checked like scored uploads; any refused image refuses the whole change. The
        images of `records` (reviewed false alarms of this product) are added too, and each
        record then names the version it went into. One budget holds for the whole change,
        record images included: `INSPECT_MAX_CHANGE_BYTES` of encoded bytes and
        `INSPECT_MAX_CHANGE_PIXELS` of decoded pixels, checked from headers before the
        runner decodes anything. A later capture `session`'s images set the threshold
        themselves (`join`: detector.sessions), so they come without calibration images
        or records."""
        product = self.served_product(product)
        if session is not None:
            check_session(session, join, calibration, records)
        elif join != "both":
            raise Refusal(400, "bad_session", "join says what a session joins: name the session.")
        records = list(dict.fromkeys(records or []))
        if len(records) > self.settings.max_batch_files:
            raise Refusal(
                413, "too_many_files", f"At most {self.settings.max_batch_files} records at once."
            )
        budget = self.settings.max_change_bytes
        used = self._check_bytes(images + calibration)
        if records:
            recorder = self._recorder()
            images = images + await anyio.to_thread.run_sync(
                recorder.false_alarm_images, records, product, budget - used
            )
        if not images:
            raise Refusal(
                400, "no_images", "Send at least one defect-free image as 'images' or 'records'."
            )
        self._check_pixels(images + calibration)
        async with self._runner_slots:
            report = await self._change(
                "add_images", product, images, reason, calibration, records, session, join, by
            )
        if records:
            tag = f"{products.model_name(report['product'])}:{report['version']}"
            await anyio.to_thread.run_sync(self._recorder().mark_added, records, tag)
            report["records"] = records
        return report

    def _check_bytes(self, images: list[bytes]) -> int:
        """One change's (or fit's) encoded bytes, within INSPECT_MAX_CHANGE_BYTES."""
        used, budget = sum(len(data) for data in images), self.settings.max_change_bytes
        if used > budget:
            raise Refusal(
                413, "too_large", f"The change holds {used} bytes; the limit is {budget}."
            )
        return used

    def _check_pixels(self, images: list[bytes]) -> None:
        """Each image's header, and their decoded pixels together within
        INSPECT_MAX_CHANGE_PIXELS, before the runner decodes any."""
        pixels = 0
        for data in images:
            width, height = self.check_header(data)
            pixels += width * height
        if pixels > self.settings.max_change_pixels:
            raise Refusal(
                413,
                "too_many_pixels",
                f"The change's images hold {pixels} pixels; the limit is "
                f"{self.settings.max_change_pixels} (INSPECT_MAX_CHANGE_PIXELS).",
            )

    # ----- new products ---------------------------------------------------------------
    async def create_product(
        self, images: list[bytes], fields: dict[str, str], sessions: list[str], by: str | None
    ) -> dict[str, Any]:
        """A new product fitted on the runner in the background (detector/serving/
        fit_jobs.py), under the same budget as a bank change; the job's first state."""
        product = products.check_product(fields.get("name", ""))
        if not images:
            raise Refusal(
                400, "no_images", "Send the new product's defect-free images as 'images'."
            )
        self._check_bytes(images)
        self._check_pixels(images)
        target = real_number(fields, "target", 0.01, 0.0, 0.5)
        ratio = real_number(fields, "coreset_ratio", None, 0.0, 1.0)
        served = (await self.model_info())["extractor"]["resolution"]
        resolution = whole_number(fields, "resolution", served, 1, 100_000)
        if resolution != served:
            raise Refusal(
                400,
                "bad_request",
                f"This server's backbone reads {served} px images; one forward pass serves "
                f"every product, so a new product here uses {served} px (leave resolution out).",
            )
        reason = fields.get("reason", "")[:500]
        async with self._runner_slots:  # the start decodes headers only; the fit runs after
            return await self._change(
                "start_fit", product, images, sessions, target, ratio, reason, by
            )

    async def fit_job(self, product: str, job_id: str, cancel: bool) -> dict[str, Any]:
        products.check_product(product)
        if not (job_id.isascii() and job_id.isalnum() and len(job_id) <= 32):
            raise Refusal(404, "unknown_job", "Job ids are the ones POST /products answered.")
        return refused_answer(await self.runner.to_async.fit_job(product, job_id, cancel))


def check_session(
    session: str, join: str, calibration: list[bytes], records: list[str] | None
) -> None:
    """A later session's change before any image is read: a valid name and join, and
    nothing else that would set the threshold."""
    check_session_name(session)
    check_join(join)  # the bank's names and the images' hashes are checked on the runner
    if calibration or records:
        raise Refusal(
            400,
            "bad_session",
            "A session's images are scored as a session the bank has not seen and set the "
            "threshold themselves: send them without calibration_images or records.",
        )
