"""The service's side of inspection records: record each answer, list and review records,
hand their images to the bank.

Recording is off the request path: `record` builds the row and queues it with the image to
keep (`RecordWriter`); the database is touched by the writer's thread and by the /records
endpoints, never while an image waits for its verdict. Every method that reads or reviews
is blocking and runs in a worker thread (`anyio.to_thread`).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy.exc import OperationalError

from detector.errors import UserError
from detector.records.activity import activity
from detector.records.errors import ImageGone, RecordsError
from detector.records.model import make_record, utc_now
from detector.records.query import MAX_PAGE, RecordQuery, parse_time
from detector.records.recording import open_recording
from detector.records.store import RecordStore, locate_records, unreachable
from detector.records.suggest import threshold_suggestion
from detector.serving import telemetry
from detector.serving.params import BadParameter, whole_number
from detector.serving.settings import Settings

log = logging.getLogger("inspection.records")
REVIEW_WINDOW_DAYS = 7  # the review gauges count reviews this recent
ACTIVITY_TTL_S = 30.0  # the overview's counts are this fresh at worst


def records_dir(settings: Settings) -> Path:
    return locate_records(settings.records_dir, settings.records_db)[0]


def records_url(settings: Settings) -> str:
    return locate_records(settings.records_dir, settings.records_db)[1]


def check_database(settings: Settings) -> None:
    """At start, with INSPECT_RECORDS_MIGRATE=check: a schema behind this code stops the
    start with one sentence. A database that does not answer is not an error: records are
    spooled until it does (and checked then)."""
    if not settings.records or settings.records_migrate != "check":
        return
    store = RecordStore(records_url(settings))
    try:
        store.check()
    except OperationalError as error:
        unreachable(store, error)
    finally:
        store.close()


def query_from(params: dict[str, str]) -> RecordQuery:
    """GET /records parameters -> a checked query; anything out of range is a 400."""
    reviewed = params.get("reviewed")
    if reviewed not in (None, "", "true", "false"):
        raise RecordsError("reviewed must be true or false.")
    try:
        limit = whole_number(params, "limit", 50, 1, MAX_PAGE)
    except BadParameter as error:
        raise RecordsError(str(error)) from None
    return RecordQuery(
        product=params.get("product") or None,
        verdict=params.get("verdict") or None,
        reviewed=None if not reviewed else reviewed == "true",
        label=params.get("label") or None,
        since=parse_time("since", params.get("since")),
        until=parse_time("until", params.get("until")),
        cursor=params.get("cursor") or None,
        limit=limit,
    )


class ChangeTooLarge(RecordsError):
    status, reason = 413, "too_large"


class Recorder:
    """One per API worker: the record writer, the kept images, and the database's readers."""

    def __init__(self, settings: Settings) -> None:
        recording = open_recording(
            records_dir(settings),
            records_url(settings),
            settings.keep_images,
            migrate=settings.records_migrate == "apply",
            images_max_age_days=settings.images_max_age_days,
            images_max_mb=settings.images_max_mb,
            max_pixels=settings.max_pixels,
            spool_max_bytes=int(settings.records_spool_mb * 2**20),
            on_count=lambda outcome, n: telemetry.records.labels(outcome).inc(n),
        )
        self.store, self.images, self.writer = (
            recording.store,
            recording.images,
            recording.writer,
        )
        self._activity: tuple[float, dict[str, Any] | None] = (0.0, None)
        self._activity_lock = threading.Lock()
        # With the database down at start, the gauges appear with the first review.
        with contextlib.suppress(OperationalError):
            self.publish_reviews()

    def close(self) -> None:
        self.writer.close()
        self.store.close()

    # ----- recording -------------------------------------------------------------------
    def record(
        self,
        answer: dict[str, Any],
        upload: bytes,
        latency_ms: float | None,
        caller: str | None,
        *,
        source: str = "service",
        name: str | None = None,
    ) -> str:
        """Queue the record of one scored image; returns its id (for the client's answer)."""
        record = make_record(
            product=answer["product"],
            image=upload,
            result=answer,
            backbone_model=answer["models"]["backbone"],
            bank_model=answer["models"]["bank"],
            settings_hash=answer["settings_hash"],
            source=source,
            latency_ms=latency_ms,
            caller=caller,
            name=name,
        )
        keep = self.images.wants(bool(answer["is_anomalous"]))
        self.writer.submit(record, upload if keep else None)
        return record["id"]

    # ----- reading and reviewing (blocking: call from a worker thread) ------------------
    def _with_availability(self, record: dict[str, Any]) -> dict[str, Any]:
        return {**record, "image_available": self.images.available(record["image_sha256"])}

    def list(self, params: dict[str, str]) -> dict[str, Any]:
        records, cursor = self.store.list(query_from(params))
        return {"records": [self._with_availability(r) for r in records], "next_cursor": cursor}

    def get(self, record_id: str) -> dict[str, Any]:
        """One record, whether its image is still kept, and every review of it."""
        record = self._with_availability(self.store.get(record_id))
        return {**record, "reviews": self.store.reviews(record_id)}

    def image(self, record_id: str) -> tuple[dict[str, Any], bytes]:
        record = self.store.get(record_id)
        data = self.images.get(record["image_sha256"])
        if data is None:
            raise ImageGone(
                f"Record {record_id}'s image is not kept (INSPECT_KEEP_IMAGES="
                f"{self.images.keep}, or retention removed it)."
            )
        return record, data

    def review(
        self, record_id: str, label: str, note: str | None, caller: str | None
    ) -> dict[str, Any]:
        """Review a record as the key `caller` (its name); the review joins the record's
        history, and the answer shows the history."""
        record = self.store.review(record_id, label, note, caller)
        telemetry.reviews.labels(record["product"], record["verdict"], label).inc()
        self.publish_reviews()
        return {**self._with_availability(record), "reviews": self.store.reviews(record_id)}

    def summary(self) -> dict[str, dict[str, int]]:
        return self.store.review_summary(since=utc_now() - timedelta(days=REVIEW_WINDOW_DAYS))

    def activity(self) -> dict[str, Any]:
        """The records' last 24 hours, counted at most once per ACTIVITY_TTL_S however many
        pages poll it (an overview refreshes every 15 s)."""
        with self._activity_lock:
            taken, counted = self._activity
            if counted is None or time.monotonic() - taken > ACTIVITY_TTL_S:
                self._activity = (time.monotonic(), activity(self.store))
            return self._activity[1]

    def publish_reviews(self) -> None:
        telemetry.publish_reviews(self.summary())

    def false_alarm_images(
        self, record_ids: list[str], product: str, max_bytes: int
    ) -> list[bytes]:
        """The kept images of records reviewed as false alarms of `product`, for its bank;
        all their bytes together within `max_bytes`, each checked before it is read."""
        images, used = [], 0
        for record_id in record_ids:
            record = self.store.get(record_id)
            if record["product"] != product:
                raise RecordsError(f"Record {record_id} is of {record['product']}, not {product}.")
            if record["review_label"] != "false_alarm":
                raise RecordsError(
                    f"Record {record_id} is not reviewed as a false alarm; only false alarms "
                    "go into a bank."
                )
            used += self.images.size(record["image_sha256"]) or 0
            if used > max_bytes:
                raise ChangeTooLarge(
                    f"The change's images, with those of the records, pass {max_bytes} bytes "
                    "(INSPECT_MAX_CHANGE_BYTES): add fewer records at once."
                )
            images.append(self.image(record_id)[1])
        return images

    def suggestion(
        self, product: str, target: float | None, days: float, keep_scores: bool = False
    ) -> dict[str, Any]:
        return threshold_suggestion(self.store, product, target, days, keep_scores)

    def mark_added(self, record_ids: list[str], bank_tag: str) -> None:
        self.store.mark_added(record_ids, bank_tag)


def open_recorder(settings: Settings) -> Recorder | None:
    if not settings.records:
        return None
    try:
        return Recorder(settings)
    except UserError:
        raise
    except Exception as error:  # recording must never stop inspection
        log.error("recording is off: the records store could not be opened (%s)", error)
        return None
