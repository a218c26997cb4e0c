"""The service's settings from INSPECT_* environment variables, read in one place.

Environment variables, not files, because that is what `docker run -e`, Cloud Run and
Kubernetes set. Every variable is optional. The service's are read here; the batch job and
the commands take flags and Hydra configs, and read only what they share with the service
(INSPECT_MODEL_STORE and INSPECT_KEEP_VERSIONS in `detector.banks`, the records location,
INSPECT_API_KEY as the batch job's default `--api-key`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from detector.drift import DriftSettings
from detector.environment import env_bool, env_choice, env_float, env_int
from detector.errors import UserError
from detector.images import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS
from detector.records.images import KEEP_POLICIES
from detector.serving.access import Access, access_from_env
from detector.threads import usable_cpus


def drift_settings() -> DriftSettings:
    """The drift window; a minimum above the window is capped to it rather than refused."""
    window = env_int("INSPECT_DRIFT_WINDOW", 200) or 200
    return DriftSettings(
        window_size=window,
        min_images=min(window, env_int("INSPECT_DRIFT_MIN_IMAGES", 20) or 20),
        alert_level=env_float("INSPECT_DRIFT_ALERT_LEVEL", 0.3, maximum=1.0),
        flag_alpha=env_float("INSPECT_DRIFT_FLAG_ALPHA", 0.001, maximum=1.0),
        defect_rate=env_float("INSPECT_EXPECTED_DEFECT_RATE", 0.0, maximum=1.0),
    )


def default_max_batch_size(device: str) -> int:
    """No batching on CPU, batches of up to 8 on a GPU.

    On CPU a ViT is no faster per image in batches (ViT-S/16 at 448 px: 281 / 286 / 277 ms
    at batch 1 / 3 / 4), and BentoML's batcher then holds a lone request back for about the
    queueing delay it saw during the last burst: after a burst at 16 clients, one client
    got 3 to 5 times less throughput (docs/PERFORMANCE.md). On a GPU batching multiplies
    throughput; 8 is a starting point, not measured here (no GPU on the development machine).
    """
    from detector.extractor import device_type

    return 1 if device_type(device) == "cpu" else 8


@dataclass(frozen=True)
class Settings:
    backbone_tag: str | None  # None: the backbone the banks were fitted with
    products: list[str]  # served products; empty: every product in the model store
    bank_cache_mb: int  # banks kept in memory, least recently used evicted first
    bank_refresh_s: float  # how often a served product's live version is checked
    device: str
    half_precision: bool
    runtime: str  # torch | openvino | onnxruntime (detector.runtimes)
    precision: str  # f32; bf16 (openvino, CPUs with bf16) or int8 (onnxruntime)
    num_threads: int | None
    max_batch_size: int
    max_latency_ms: int
    max_bytes: int
    max_pixels: int
    max_batch_files: int
    max_batch_bytes: int
    max_queue: int  # requests with their body in (waiting, scoring) before 503
    max_uploads: int  # bodies being received at once before 503
    upload_idle_s: float  # an upload that sends nothing this long is cut (408)
    upload_min_kbps: float  # after its first seconds, an upload slower than this is cut
    retry_after_s: int
    heatmap_max_side: int  # heatmaps and overlays are made at most this long
    max_renders: int  # overlays drawn at once (each holds a decoded image)
    # Keys and roles, anonymous access, host names answered (detector/serving/access.py);
    # its keys never appear in repr.
    access: Access
    max_change_bytes: int  # one bank change: uploads and reviewed records' images together
    max_change_pixels: int  # one bank change: decoded pixels of all its images
    drift: DriftSettings
    records: bool  # record every decision (detector/records)
    records_dir: str | None  # None: <BENTOML_HOME>/records
    records_db: str | None  # a SQLAlchemy URL; None: SQLite in records_dir
    records_migrate: str  # apply | check: what start-up does with an older schema
    keep_images: str  # flagged | all | none
    images_max_age_days: float
    images_max_mb: float
    records_spool_mb: float

    @classmethod
    def from_env(cls) -> Settings:
        if os.environ.get("INSPECT_BANK_MODEL"):
            raise UserError(
                "INSPECT_BANK_MODEL is no longer read: banks are the models bank-<product> "
                "now; name the products to serve with INSPECT_PRODUCTS (after `python -m "
                "detector export`), or roll a product back to the version you want served."
            )
        device = os.environ.get("INSPECT_DEVICE", "auto")
        return cls(
            backbone_tag=os.environ.get("INSPECT_BACKBONE_MODEL") or None,
            products=[
                name.strip()
                for name in os.environ.get("INSPECT_PRODUCTS", "").split(",")
                if name.strip()
            ],
            bank_cache_mb=env_int("INSPECT_BANK_CACHE_MB", 1024),
            bank_refresh_s=env_float("INSPECT_BANK_REFRESH_S", 1.0),
            device=device,
            half_precision=env_bool("INSPECT_HALF_PRECISION", False),
            runtime=os.environ.get("INSPECT_RUNTIME", "").strip() or "torch",
            precision=os.environ.get("INSPECT_PRECISION", "").strip() or "f32",
            # Explicit by default: BentoML may set OMP_NUM_THREADS=1 in its workers, which
            # halves a CPU ViT's speed (measured: docs/PERFORMANCE.md).
            num_threads=env_int("INSPECT_THREADS", usable_cpus()),
            max_batch_size=env_int("INSPECT_MAX_BATCH_SIZE", None)
            or default_max_batch_size(device),
            # BentoML answers 503 to a request whose wait plus predicted batch time (queue
            # length x its per-image estimate) passes this: a load-shedding budget that must
            # cover a full queue (16 clients x 0.55 s/img on 2 cores was shed at 30 s).
            max_latency_ms=env_int("INSPECT_MAX_LATENCY_MS", 60000),
            max_bytes=env_int("INSPECT_MAX_BYTES", DEFAULT_MAX_BYTES),
            max_pixels=env_int("INSPECT_MAX_PIXELS", DEFAULT_MAX_PIXELS),
            max_batch_files=env_int("INSPECT_MAX_BATCH_FILES", 32),
            max_batch_bytes=env_int("INSPECT_MAX_BATCH_BYTES", 256 << 20),
            # Waiting is bounded, not the number of clients: with the runner at ~0.35 s per
            # 448 px image on 2 cores, 16 requests in flight keep an accepted request's
            # wait under ~6 s; the rest get 503 + Retry-After at once (docs/PERFORMANCE.md).
            max_queue=env_int("INSPECT_MAX_QUEUE", 16),
            # Uploads hold these, not queue slots, at a pace any plant network keeps.
            max_uploads=env_int("INSPECT_MAX_UPLOADS", 64),
            upload_idle_s=env_float("INSPECT_UPLOAD_IDLE_S", 10.0),
            upload_min_kbps=env_float("INSPECT_UPLOAD_MIN_KBPS", 16.0),
            retry_after_s=env_int("INSPECT_RETRY_AFTER_S", 2),
            heatmap_max_side=env_int("INSPECT_HEATMAP_MAX_SIDE", 2048),
            max_renders=env_int("INSPECT_MAX_RENDERS", 2),
            access=access_from_env(),
            # One bank change's encoded bytes travel whole: bound them, and its pixels.
            max_change_bytes=env_int("INSPECT_MAX_CHANGE_BYTES", 64 << 20),
            max_change_pixels=env_int("INSPECT_MAX_CHANGE_PIXELS", 160_000_000),
            # The drift window: images compared with the bank's calibration reference.
            drift=drift_settings(),
            records=env_bool("INSPECT_RECORDS", True),
            records_dir=os.environ.get("INSPECT_RECORDS_DIR") or None,
            records_db=os.environ.get("INSPECT_RECORDS_DB") or None,
            records_migrate=env_choice("INSPECT_RECORDS_MIGRATE", "apply", ("apply", "check")),
            keep_images=env_choice("INSPECT_KEEP_IMAGES", "flagged", KEEP_POLICIES),
            images_max_age_days=env_float("INSPECT_IMAGES_MAX_AGE_DAYS", 30.0),
            images_max_mb=env_float("INSPECT_IMAGES_MAX_MB", 2048.0),
            records_spool_mb=env_float("INSPECT_RECORDS_SPOOL_MB", 256.0),
        )
