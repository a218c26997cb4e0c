"""New products fitted over HTTP (`POST /products`), as background jobs in the runner's
process: the backbone is already loaded there, and a new product must be fitted with the
very extractor that will score it.

- One fit at a time per server; another request while one runs is answered 503 with a
  Retry-After estimated from the running fit's pace (a fit holds the CPU for seconds to
  minutes: a queue would only hide that wait).
- A fit never starves inspection: its thread (and the OpenMP threads it starts for the
  backbone) runs only on cores that scoring leaves idle (`lower_priority`), so scoring
  threads take the cores whenever they want them (measured in docs/PERFORMANCE.md); the
  graph runtimes serve one call at a time, so there a fit's image waits its turn like a
  scored one.
- A job ends `done` (v1 live), `failed` (a sentence; nothing saved) or `cancelled`
  (nothing saved). The product is committed in one step under its lock (changes.new_product),
  so a cancel, a failure, or the server stopping mid-fit never leaves half a product in the
  store. Jobs live in memory: after a restart a job id is unknown, and the answer says so.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from hashlib import sha256
from pathlib import Path
from typing import Any

from PIL import Image

from detector.banks import changes
from detector.errors import UserError
from detector.images import InvalidImageError, decode_image
from detector.memory_bank import BankConfig
from detector.scoring import ScoringConfig
from detector.serving.catalog import BankCatalog
from detector.serving.fit_requests import FitRefused, FitRequest, check_request
from detector.serving.settings import Settings
from detector.sessions import remember_images

log = logging.getLogger("inspection")
KEPT_JOBS = 32  # finished jobs still answered by GET; older ones are forgotten
FIT_NICENESS = 19
FINISHED = ("done", "failed", "cancelled")


class FitCancelled(Exception):
    """Raised inside a fit at its next step once the job is cancelled."""


@dataclass
class FitJob:
    product: str
    images: int
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    state: str = "running"  # running | done | failed | cancelled
    stage: str = "decoding"  # decoding | features | crops | folds | saving
    done: int = 0
    total: int = 0
    started: float = field(default_factory=time.monotonic)
    seconds: float | None = None
    version: str | None = None
    failure: str | None = None
    calibration: dict[str, Any] | None = None
    cancel: threading.Event = field(default_factory=threading.Event, repr=False)
    # Seconds spent in each finished stage: where a fit's time goes, told with its state.
    stage_seconds: dict[str, float] = field(default_factory=dict)
    stage_started: float = field(default_factory=time.monotonic)

    def step(self, stage: str, done: int, total: int) -> None:
        """`fit_detector`'s progress report; where a cancelled fit stops."""
        if self.cancel.is_set():
            raise FitCancelled
        if stage != self.stage:
            self.end_stage()
        self.stage, self.done, self.total = stage, done, total

    def end_stage(self) -> None:
        now = time.monotonic()
        spent = self.stage_seconds.get(self.stage, 0.0) + now - self.stage_started
        self.stage_seconds[self.stage], self.stage_started = round(spent, 3), now

    @property
    def fraction(self) -> float:
        """Share of the work done: reading images (with the backbone) is most of it."""
        if self.state == "done":
            return 1.0
        weights = {
            "decoding": (0.0, 0.05),
            "features": (0.05, 0.7),
            "crops": (0.75, 0.05),  # the bank's images read again for their patches' crops
            "folds": (0.8, 0.15),
        }
        start, span = weights.get(self.stage, (0.95, 0.05))
        return round(start + span * (self.done / self.total if self.total else 0.0), 3)

    def to_dict(self) -> dict[str, Any]:
        elapsed = self.seconds if self.seconds is not None else time.monotonic() - self.started
        return {
            "job": self.id,
            "product": self.product,
            "state": self.state,
            "stage": self.stage,
            "progress": self.fraction,
            "images": self.images,
            "seconds": round(elapsed, 2),
            "stage_seconds": dict(self.stage_seconds),
            "version": self.version,
            "failure": self.failure,
            "calibration": self.calibration,
            # A cancel that comes while the version is being committed is too late: the
            # job then ends done, and the product is live.
            "cancel_requested": self.cancel.is_set(),
        }


class FitJobs:
    """The runner's fit jobs: at most one running, the latest `KEPT_JOBS` remembered."""

    def __init__(self, catalog: BankCatalog, settings: Settings) -> None:
        self.catalog = catalog
        self.settings = settings
        self._jobs: OrderedDict[str, FitJob] = OrderedDict()
        self._running: FitJob | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def start(self, request: FitRequest) -> dict[str, Any]:
        """Check the request, then fit in the background; the job's first state."""
        check_request(request, self.settings, self.catalog.pinned)
        with self._lock:
            if self._running is not None:
                raise self._busy(self._running)
            job = FitJob(request.product, len(request.uploads))
            self._running = job
            self._remember(job)
            self._thread = threading.Thread(
                target=self._run, args=(job, request), name=f"fit-{job.id}", daemon=True
            )
        self._thread.start()
        log.info("%s: fit job %s started on %d images", job.product, job.id, job.images)
        return job.to_dict()

    def status(self, product: str, job_id: str) -> dict[str, Any]:
        return self._job(product, job_id).to_dict()

    def cancel(self, product: str, job_id: str) -> dict[str, Any]:
        """Stop a running fit at its next step; nothing of it is saved."""
        job = self._job(product, job_id)
        if job.state == "done":
            raise FitRefused(
                409,
                "job_finished",
                f"The fit finished: {product} {job.version} is live. Roll it back or add "
                "images to change it.",
            )
        job.cancel.set()
        return job.to_dict()

    def stop(self, timeout: float = 20.0) -> None:
        """Cancel a running fit and wait for it (the server is stopping)."""
        with self._lock:
            running, thread = self._running, self._thread
        if running is not None and thread is not None:
            running.cancel.set()
            thread.join(timeout)

    def _busy(self, running: FitJob) -> FitRefused:
        elapsed = time.monotonic() - running.started
        share = max(running.fraction, 0.05)
        left = max(1, math.ceil(elapsed / share - elapsed))
        return FitRefused(
            503,
            "fit_busy",
            f"This server is fitting {running.product} (job {running.id}); one fit runs at a "
            f"time. Retry in about {left} s.",
            retry_after=left,
        )

    def _job(self, product: str, job_id: str) -> FitJob:
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None or job.product != product:
            raise FitRefused(
                404,
                "unknown_job",
                f"No fit job {job_id[:16]!r} for {product} on this server. Jobs end with the "
                "server that runs them: a fit cut off by a restart saved nothing (see GET "
                "/products), so send it again.",
            )
        return job

    def _remember(self, job: FitJob) -> None:
        self._jobs[job.id] = job
        while len(self._jobs) > KEPT_JOBS:
            oldest = next(iter(self._jobs))
            if self._jobs[oldest].state not in FINISHED:
                break
            self._jobs.pop(oldest)

    # ----- the fit -------------------------------------------------------------------
    def _run(self, job: FitJob, request: FitRequest) -> None:
        lower_priority()
        try:
            model = self._fit(job, request)
            job.version = str(model.tag.version)
            job.calibration = model.info.metadata.get("calibration")
            job.state = "done"
            log.info("%s: fitted over HTTP, %s live (job %s)", job.product, model.tag, job.id)
        except FitCancelled:
            job.state = "cancelled"
            log.warning("%s: fit job %s cancelled; nothing saved", job.product, job.id)
        except (UserError, InvalidImageError, ValueError) as error:
            job.state, job.failure = "failed", str(error)
            log.warning("%s: fit job %s failed: %s", job.product, job.id, error)
        except Exception as error:  # the runner keeps serving; the job says where to look
            job.state, job.failure = "failed", "The fit failed (the server log says why)."
            log.error("%s: fit job %s failed", job.product, job.id, exc_info=error)
        finally:
            job.end_stage()
            job.seconds = time.monotonic() - job.started
            with self._lock:
                self._running = None

    def _fit(self, job: FitJob, request: FitRequest) -> Any:
        from detector.fitting import fit_detector

        extractor = self.catalog.extractor
        images = Uploads(request.uploads, self.settings)
        detector = fit_detector(
            extractor,
            images,
            sessions=request.sessions or None,
            bank_config=BankConfig(**fit_bank_options(request)),
            scoring=ScoringConfig(false_alarm_rate=request.target),
            batch_size=self.settings.max_batch_size,
            progress=False,
            report=job.step,
        )
        job.step("saving", 0, 1)
        detector.bank.metadata.update(category=request.product, product=request.product)
        hashes = [sha256(data).hexdigest() for data in request.uploads]
        remember_images(detector.bank.metadata, hashes)  # none may come back as a session
        change = {
            "source": "http",
            "reason": request.reason,
            "train_images": len(request.uploads),
            "sessions": sorted(set(request.sessions)) if request.sessions else None,
            "requested_by": request.requested_by,
        }
        with tempfile.TemporaryDirectory(prefix="http-fit-") as scratch:
            folder = detector.save(Path(scratch) / "bank")
            if job.cancel.is_set():
                raise FitCancelled
            model = changes.new_product(
                request.product,
                folder,
                self.catalog.backbone_tag,
                change,
                labels={"category": request.product, "backbone_model": self.catalog.backbone_tag},
            )
        self.catalog.install(model)
        return model


class Uploads(Sequence[Image.Image]):
    """The uploaded images, decoded one at a time as the fit reads them (with the service's
    limits): a fit holds one decoded frame at a time, never all of them."""

    def __init__(self, uploads: list[bytes], settings: Settings) -> None:
        self.uploads, self.settings = uploads, settings

    def __len__(self) -> int:
        return len(self.uploads)

    def name_of(self, index: int) -> str:
        """An upload as explanations name it (the fit request keeps no file names)."""
        return f"upload {index + 1} of the fit"

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        try:
            return decode_image(
                self.uploads[index],
                max_bytes=self.settings.max_bytes,
                max_pixels=self.settings.max_pixels,
            )
        except InvalidImageError as error:
            raise InvalidImageError(
                error.reason, f"Image {index + 1}: {error}", error.status
            ) from None


def fit_bank_options(request: FitRequest) -> dict[str, Any]:
    return {} if request.coreset_ratio is None else {"coreset_ratio": request.coreset_ratio}


def lower_priority() -> None:
    """The calling thread (and the OpenMP threads it starts) at the lowest CPU priority, so
    scoring takes the cores whenever it wants them: Linux's SCHED_IDLE (runs only on a core
    nothing else wants), else niceness 19 (still a share of 1.5 % against scoring's 98.5 %),
    elsewhere a no-op."""
    thread = threading.get_native_id()
    try:
        os.sched_setscheduler(thread, os.SCHED_IDLE, os.sched_param(0))
        return
    except (AttributeError, OSError):
        pass
    try:
        os.setpriority(os.PRIO_PROCESS, thread, FIT_NICENESS)
    except (AttributeError, OSError) as error:
        log.info("fit runs at normal priority: %s", error)
