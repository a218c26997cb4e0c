"""Records written off the request path: queued, written in batches by one thread, spooled
to local files while the database cannot take them, and written from there when it can.

A request only puts its record on a queue (microseconds). The thread stores the kept image,
then writes up to `batch_size` records in one transaction. A failed write goes to the spool
(JSON lines, fsynced) and the spool is retried every `retry_s`; records are written with
their ids, so a spool file written twice still adds each record once. Nothing is lost
unless the spool is full (`spool_max_bytes`) or the queue overflows: those are counted as
dropped, never raised to the request, and a dropped record's image is not kept either.
Images waiting in the queue are bounded too (`max_queued_image_bytes`): beyond it a record
is queued without its image (`image_kept` false, counted as `image_not_kept`).
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from detector.files import write_atomic
from detector.records.images import ImageStore
from detector.records.store import RecordStore, safe_url, spooled_line

log = logging.getLogger("inspection.records")
OUTCOMES = ("written", "spooled", "dropped", "image_not_kept")


class RecordWriter:
    def __init__(
        self,
        store: RecordStore,
        spool_dir: Path,
        images: ImageStore | None = None,
        *,
        prepare: Callable[[], None] | None = None,
        batch_size: int = 256,
        flush_s: float = 0.25,
        retry_s: float = 2.0,
        prune_s: float = 600.0,
        spool_max_bytes: int = 256 << 20,
        queue_size: int = 20000,
        max_queued_image_bytes: int = 128 << 20,
        on_count: Callable[[str, int], None] | None = None,
    ) -> None:
        self.store = store
        self.images = images
        self.spool_dir = Path(spool_dir)
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        self.batch_size, self.flush_s, self.retry_s = batch_size, flush_s, retry_s
        self.prune_s = prune_s
        self.spool_max_bytes = spool_max_bytes
        self.counts = dict.fromkeys(OUTCOMES, 0)
        self.max_queued_image_bytes = max_queued_image_bytes
        self._queued_image_bytes = 0
        self._image_bytes_lock = threading.Lock()
        self._on_count = on_count
        self._queue: queue.Queue[tuple[dict[str, Any], bytes | None] | None] = queue.Queue(
            queue_size
        )
        # Run before the first write that succeeds: migrate (or check) the schema, once the
        # database answers.
        self._prepare = prepare
        self._next_retry = 0.0
        self._next_prune = time.monotonic() + 5.0
        self._thread = threading.Thread(target=self._run, name="record-writer", daemon=True)
        self._thread.start()

    # ----- the request side ------------------------------------------------------------
    def submit(self, record: dict[str, Any], image: bytes | None = None) -> bool:
        """Queue a record (and the image to keep with it); never blocks, never raises."""
        if image is not None:
            with self._image_bytes_lock:
                if self._queued_image_bytes + len(image) > self.max_queued_image_bytes:
                    image = None
                else:
                    self._queued_image_bytes += len(image)
            if image is None:
                self._count("image_not_kept", 1)
        try:
            self._queue.put_nowait((record, image))
            return True
        except queue.Full:
            self._release(image)
            self._count("dropped", 1)
            log.error("record queue full: record %s dropped", record.get("id"))
            return False

    def _release(self, image: bytes | None) -> None:
        if image is not None:
            with self._image_bytes_lock:
                self._queued_image_bytes -= len(image)

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until every queued record is written or spooled (tests, shutdown)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._queue.unfinished_tasks == 0:
                return True
            time.sleep(0.02)
        return False

    def close(self, timeout: float = 30.0) -> None:
        self.flush(timeout)
        self._queue.put(None)
        self._thread.join(timeout)

    def pending_spool(self) -> int:
        """Records waiting in the spool for the database."""
        total = 0
        for path in self._spool_files():
            with path.open("rb") as handle:
                total += sum(1 for _ in handle)
        return total

    # ----- the thread ------------------------------------------------------------------
    def _count(self, outcome: str, number: int) -> None:
        if number:
            self.counts[outcome] += number
            if self._on_count is not None:
                self._on_count(outcome, number)

    def _run(self) -> None:
        while True:
            batch: list[dict[str, Any]] = []
            created: list[str] = []  # images first kept for this batch's records
            stop = False
            deadline = time.monotonic() + self.flush_s
            while len(batch) < self.batch_size:
                try:
                    item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if item is None:
                    self._queue.task_done()
                    stop = True
                    break
                record, image = item
                kept = self._keep_image(record, image)
                self._release(image)
                batch.append({**record, "image_kept": kept is not None})
                if kept:
                    created.append(record["image_sha256"])
            try:
                if batch:
                    self._write(batch, created)
                self._retry_spool()
                self._prune()
            except Exception:  # the writer must outlive any bug in one batch
                log.exception("record writer: unexpected error")
            finally:
                for _ in batch:
                    self._queue.task_done()
            if stop:
                return

    def _keep_image(self, record: dict[str, Any], image: bytes | None) -> bool | None:
        """`ImageStore.put`'s answer (None: not kept)."""
        if image is None or self.images is None:
            return None
        try:
            return self.images.put(record["image_sha256"], image)
        except OSError as error:
            log.warning("could not keep image %s: %s", record["image_sha256"], error)
            return None

    def _ensure_schema(self) -> None:
        if self._prepare is not None:
            self._prepare()
            self._prepare = None

    def _write(self, batch: list[dict[str, Any]], created: list[str] | None = None) -> None:
        if self._spool_files():  # the database was down: keep the order, spool behind
            self._spool(batch, created)
            return
        try:
            self._ensure_schema()
            self.store.insert(batch)
            self._count("written", len(batch))
        except Exception as error:  # any database failure: the records wait on disk
            log.warning(
                "records database %s unavailable (%s): spooling %d records",
                safe_url(self.store.url),
                type(error).__name__,
                len(batch),
            )
            self._spool(batch, created)

    def _spool_files(self) -> list[Path]:
        return sorted(self.spool_dir.glob("spool-*.jsonl"))

    def _spool(self, batch: list[dict[str, Any]], created: list[str] | None = None) -> None:
        used = sum(path.stat().st_size for path in self._spool_files())
        text = "".join(spooled_line(record) + "\n" for record in batch).encode()
        if used + len(text) > self.spool_max_bytes:
            self._count("dropped", len(batch))
            log.error("record spool full (%d bytes): %d records dropped", used, len(batch))
            if self.images is not None:  # no record will ever name these images
                for sha256 in created or []:
                    self.images.remove(sha256)
            return
        path = self.spool_dir / f"spool-{time.time_ns():020d}.jsonl"
        write_atomic(path, text)
        self._count("spooled", len(batch))
        self._next_retry = min(self._next_retry, time.monotonic() + self.retry_s)

    def _retry_spool(self) -> None:
        files = self._spool_files()
        if not files or time.monotonic() < self._next_retry:
            return
        self._next_retry = time.monotonic() + self.retry_s
        for path in files:
            records = [json.loads(line) for line in path.read_text().splitlines() if line]
            try:
                self._ensure_schema()
                self.store.insert(records)
            except Exception as error:
                log.info("records database still unavailable (%s)", type(error).__name__)
                return
            path.unlink()
            self._count("written", len(records))
            log.info("wrote %d spooled records from %s", len(records), path.name)

    def _prune(self) -> None:
        if self.images is None or time.monotonic() < self._next_prune:
            return
        self._next_prune = time.monotonic() + self.prune_s
        pruned = self.images.prune()
        if pruned.removed:
            log.info("image retention removed %d images (%d bytes)", *vars(pruned).values())
