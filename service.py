"""BentoML inspection service: a batching runner that scores images, behind an HTTP API.

    bentoml serve                      # http://localhost:3000, web page at /ui
    bentoml build && bentoml containerize dino-inspection:latest

Declarations only: what each endpoint does lives in detector/serving/ (runner.py for the
runner, api.py for the public endpoints), settings in detector/serving/settings.py.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import bentoml
from PIL import Image
from starlette.applications import Starlette
from starlette.routing import Route

from detector.errors import user_errors_exit
from detector.serving.access import serving_host
from detector.serving.callers import caller, load_test, role
from detector.serving.gate import RequestGate
from detector.serving.page import page_response
from detector.serving.product_routes import products_app
from detector.serving.record_routes import records_app
from detector.serving.replicas import check_records_location, separate_metrics
from detector.serving.served_models import resolve_models
from detector.serving.settings import Settings
from detector.serving.supervisor import private_supervisor
from detector.serving.telemetry import bounded_http_metrics

# No product bank, mismatched models, an uninstalled runtime or a graph of other weights, or a
# malformed setting, stops `bentoml serve` and `bentoml build` here with one sentence,
# instead of workers that fail and restart forever.
bounded_http_metrics()  # before BentoML builds its app: one metrics series per route

with user_errors_exit():
    SETTINGS = Settings.from_env()
    # In the `bentoml serve` process only (BIND is None in workers and `bentoml build`):
    # refuse a keyless start on the network, say once who may do what, and give this
    # server a metrics folder of its own before BentoML makes one in the shared home.
    BIND = serving_host(sys.argv)
    if BIND is not None:
        SETTINGS.access.check_start(BIND)
        check_records_location(SETTINGS)
        separate_metrics()
        private_supervisor()
        logging.getLogger("bentoml.serve").warning("inspection %s", SETTINGS.access.posture())
    _backbone, _banks, REFUSED = resolve_models(
        SETTINGS.products, SETTINGS.backbone_tag, SETTINGS.runtime, SETTINGS.precision
    )
    if BIND is not None:
        for _why in REFUSED.values():  # also in /products and inspection_bank_unavailable
            logging.getLogger("bentoml.serve").error("not served: %s", _why)
    # INSPECT_RECORDS_MIGRATE=check: a records schema behind this code stops the start here
    # (with =apply, the default, the API worker migrates it when it starts). SQLAlchemy and
    # the endpoints are imported only where they are used: the serve process and the runner
    # start sooner without them.
    if SETTINGS.records and SETTINGS.records_migrate == "check":
        from detector.serving.records import check_database

        check_database(SETTINGS)
BACKBONE_MODEL = bentoml.models.BentoModel(str(_backbone.tag))
# Each product's live bank at start, declared so `bentoml build` packs it; later versions
# are read from the model store as they are made (detector/serving/catalog.py).
BANK_MODELS = {name: bentoml.models.BentoModel(str(bank.tag)) for name, bank in _banks.items()}

# INSPECT_MAX_BATCH_SIZE=1 (the default on CPU, see detector/serving/settings.py) turns
# adaptive batching off: BentoML needs a maximum above 1, and the runner takes one call at
# a time.
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
    """Decodes and scores uploads; with batching on, concurrent requests arrive as one batch."""

    backbone_model = BACKBONE_MODEL

    def __init__(self) -> None:
        from detector.banks.models import load_extractor
        from detector.serving.runner import ScoringRunner
        from detector.threads import set_threads

        set_threads(SETTINGS.num_threads)
        backbone = BACKBONE_MODEL.stored
        banks = {name: model.stored for name, model in BANK_MODELS.items()}
        extractor = load_extractor(
            backbone,
            banks,
            SETTINGS.runtime,
            SETTINGS.precision,
            device=SETTINGS.device,
            half_precision=SETTINGS.half_precision,
            num_threads=SETTINGS.num_threads,
        )
        products = [*banks, *REFUSED]  # the refused are listed and answer 503 with why
        self.runner = ScoringRunner(extractor, str(backbone.tag), products, SETTINGS)

    def __is_ready__(self) -> bool:
        return getattr(self, "runner", None) is not None

    @bentoml.api(**BATCHING)
    def score(self, uploads: list[tuple[str, bytes, bool]]) -> list[dict[str, Any]]:
        return self.runner.score_uploads(uploads, with_maps=False)

    @bentoml.api(**BATCHING)
    def score_with_maps(self, uploads: list[tuple[str, bytes, bool]]) -> list[dict[str, Any]]:
        return self.runner.score_uploads(uploads, with_maps=True)

    # A load test's images: scored the same way, left out of the drift window.
    @bentoml.api(**BATCHING)
    def score_unwatched(self, uploads: list[tuple[str, bytes, bool]]) -> list[dict[str, Any]]:
        return self.runner.score_uploads(uploads, with_maps=False, watch=False)

    @bentoml.api(**BATCHING)
    def score_with_maps_unwatched(
        self, uploads: list[tuple[str, bytes, bool]]
    ) -> list[dict[str, Any]]:
        return self.runner.score_uploads(uploads, with_maps=True, watch=False)

    @bentoml.api
    def redraw(self, product: str, upload: bytes) -> dict[str, Any]:
        """A recorded image scored again with its map, for review; not counted as traffic."""
        (answer,) = self.runner.score_uploads(
            [(product, upload, True)], with_maps=True, watch=False
        )
        return answer

    @bentoml.api
    def model_info(self) -> dict[str, Any]:
        return self.runner.model_info()

    @bentoml.api
    def drift(self, product: str, reference: bool) -> dict[str, Any]:
        return self.runner.drift(product, reference)

    @bentoml.api
    def products(self) -> list[dict[str, Any]]:
        return self.runner.products()

    @bentoml.api
    def add_images(
        self,
        product: str,
        uploads: list[bytes],
        reason: str,
        calibration: list[bytes],
        records: list[str],
        session: str | None = None,
        join: str = "both",
        by: str | None = None,
    ) -> dict[str, Any]:
        return self.runner.add_images(
            product, uploads, reason, calibration, records, session, join, by
        )

    @bentoml.api
    def start_fit(
        self,
        product: str,
        uploads: list[bytes],
        sessions: list[str],
        target: float,
        coreset_ratio: float | None,
        reason: str,
        requested_by: str | None,
    ) -> dict[str, Any]:
        """A new product's fit, in the background here; the job's first state."""
        from detector.serving.fit_requests import FitRequest

        request = FitRequest(
            product, uploads, sessions, target, coreset_ratio, reason, requested_by
        )
        return self.runner.start_fit(request)

    @bentoml.api
    def fit_job(self, product: str, job_id: str, cancel: bool) -> dict[str, Any]:
        return self.runner.fit_job(product, job_id, cancel)

    @bentoml.on_shutdown
    def stop_fits(self) -> None:
        """A fit still running is cancelled (nothing of it is saved) before the worker exits."""
        if getattr(self, "runner", None) is not None:
            self.runner.fits.stop()

    # Each change's `by` is the name of the API key that asked for it (the history says so).
    @bentoml.api
    def rollback(
        self, product: str, version: str, reason: str, by: str | None = None
    ) -> dict[str, Any]:
        return self.runner.rollback(product, version, reason, by)

    @bentoml.api
    def set_threshold(
        self, product: str, change: dict[str, Any], by: str | None = None
    ) -> dict[str, Any]:
        return self.runner.set_threshold(product, change, by)

    @bentoml.api
    def set_mask(
        self, product: str, mask: bytes | None, reason: str, by: str | None = None
    ) -> dict[str, Any]:
        return self.runner.set_mask(product, mask, reason, by)


# Each product's bank is declared for `bentoml build` to pack, as a class attribute would be
# (BentoML collects them into `models` when the class is decorated).
InspectionRunner.models.extend(BANK_MODELS.values())

ui_app = Starlette(routes=[Route("/", lambda request: page_response())])


@bentoml.asgi_app(ui_app, path="/ui")
@bentoml.asgi_app(products_app, path="/products")
@bentoml.asgi_app(records_app, path="/records")
@bentoml.service(name="inspection_api", workers=1, traffic={"timeout": 300})
class InspectionAPI:
    """Public endpoints: /inspect, /heatmap, /inspect_batch, /model_info, /drift, /ui,
    /products (detector/serving/product_routes.py) and /records (record_routes.py)."""

    runner = bentoml.depends(InspectionRunner)

    def __init__(self) -> None:
        from detector.serving.api import InspectionEndpoints
        from detector.serving.records import open_recorder

        self.endpoints = InspectionEndpoints(self.runner, SETTINGS, open_recorder(SETTINGS))

    @bentoml.on_shutdown
    def close_records(self) -> None:
        """Write the records still queued (or spool them) before the worker exits."""
        if self.endpoints.recorder is not None:
            self.endpoints.recorder.close()

    @bentoml.api
    async def inspect(
        self,
        image: Path,
        ctx: bentoml.Context,
        product: str = "",
        drift_profile: bool = False,
        explain: bool = False,
    ) -> dict[str, Any]:
        """One image -> score, threshold, normalised score, verdict, size, models, timing.
        `product` may be left out when one product is served; `drift_profile=true` adds the
        image's patch-distance profile (for the batch job); `explain=true` (a reviewer's
        key) its most anomalous region beside the nearest normal patch of the bank."""
        work = self.endpoints.inspect(
            image, product, drift_profile, caller(ctx), load_test(ctx), explain, role(ctx)
        )
        return await self.endpoints.respond(ctx, work)

    @bentoml.api
    async def heatmap(
        self,
        image: Path,
        ctx: bentoml.Context,
        product: str = "",
        output: str = "overlay",
        drift_profile: bool = False,
        explain: bool = False,
    ) -> Image.Image:
        """One image -> PNG `overlay`, 16-bit `map` (2 x threshold = 65535), or float32 `npy`;
        the X-Inspection header carries the /inspect JSON, so a client scores once."""
        work = self.endpoints.heatmap(
            image, product, output, drift_profile, caller(ctx), load_test(ctx), explain, role(ctx)
        )
        return await self.endpoints.respond(ctx, work)

    @bentoml.api
    async def inspect_batch(
        self, images: list[Path], ctx: bentoml.Context, product: str = ""
    ) -> list[dict[str, Any]]:
        """Several images of one product -> one result each, in order; a bad image gets an
        error entry."""
        work = self.endpoints.inspect_batch(images, product, caller(ctx), load_test(ctx))
        return await self.endpoints.respond(ctx, work)

    @bentoml.api(route="/model_info")
    async def model_info(self, ctx: bentoml.Context) -> dict[str, Any]:
        return await self.endpoints.respond(ctx, self.endpoints.model_info())

    @bentoml.api(route="/drift")
    async def drift(
        self, ctx: bentoml.Context, product: str = "", reference: bool = False
    ) -> dict[str, Any]:
        """A product's recent traffic against its calibration images; `reference=true` adds
        the reference profiles."""
        return await self.endpoints.respond(ctx, self.endpoints.drift(product, reference))


# Key, size, queue and upload-shape checks before BentoML reads a body (detector/serving/gate.py).
InspectionAPI.add_asgi_middleware(RequestGate, settings=SETTINGS)
