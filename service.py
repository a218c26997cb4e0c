"""BentoML inspection service: a batching runner that scores images, behind an HTTP API.

    bentoml serve                      # http://localhost:3000, web page at /ui
    bentoml build && bentoml containerize dino-inspection:latest

Declarations only: what each endpoint does lives in detector/serving/ (runner.py for the
runner, api.py for the public endpoints), settings in detector/serving/settings.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import bentoml
from PIL import Image
from starlette.applications import Starlette
from starlette.responses import HTMLResponse
from starlette.routing import Route

from detector.errors import user_errors_exit
from detector.serving.api import InspectionEndpoints
from detector.serving.gate import RequestGate
from detector.serving.model_store import resolve_pair
from detector.serving.settings import Settings

# A missing or mismatched model pair, an uninstalled runtime or a graph of other weights, or a
# malformed setting, stops `bentoml serve` and `bentoml build` here with one sentence,
# instead of workers that fail and restart forever.
with user_errors_exit():
    SETTINGS = Settings.from_env()
    _backbone, _bank = resolve_pair(
        SETTINGS.bank_tag, SETTINGS.backbone_tag, SETTINGS.runtime, SETTINGS.precision
    )
BACKBONE_MODEL = bentoml.models.BentoModel(str(_backbone.tag))
BANK_MODEL = bentoml.models.BentoModel(str(_bank.tag))
PAGE = (Path(__file__).parent / "detector" / "serving" / "static" / "index.html").read_text()

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
    bank_model = BANK_MODEL

    def __init__(self) -> None:
        from detector.serving.model_store import load_pair
        from detector.serving.runner import ScoringRunner
        from detector.threads import set_threads

        set_threads(SETTINGS.num_threads)
        pair = load_pair(
            str(BANK_MODEL.tag),
            str(BACKBONE_MODEL.tag),
            runtime=SETTINGS.runtime,
            precision=SETTINGS.precision,
            device=SETTINGS.device,
            half_precision=SETTINGS.half_precision,
            num_threads=SETTINGS.num_threads,
            batch_size=SETTINGS.max_batch_size,
        )
        self.runner = ScoringRunner(pair.detector, pair.tags, SETTINGS)

    def __is_ready__(self) -> bool:
        return getattr(self, "runner", None) is not None

    @bentoml.api(**BATCHING)
    def score(self, uploads: list[bytes]) -> list[dict[str, Any]]:
        return self.runner.score_uploads(uploads, with_maps=False)

    @bentoml.api(**BATCHING)
    def score_with_maps(self, uploads: list[bytes]) -> list[dict[str, Any]]:
        return self.runner.score_uploads(uploads, with_maps=True)

    @bentoml.api
    def model_info(self) -> dict[str, Any]:
        return self.runner.model_info()


ui_app = Starlette(routes=[Route("/", lambda request: HTMLResponse(PAGE))])


@bentoml.asgi_app(ui_app, path="/ui")
@bentoml.service(name="inspection_api", workers=1, traffic={"timeout": 300})
class InspectionAPI:
    """Public endpoints: /inspect, /heatmap, /inspect_batch, /model_info, /drift, /ui."""

    runner = bentoml.depends(InspectionRunner)

    def __init__(self) -> None:
        self.endpoints = InspectionEndpoints(self.runner, SETTINGS)

    @bentoml.api
    async def inspect(
        self, image: Path, ctx: bentoml.Context, drift_profile: bool = False
    ) -> dict[str, Any]:
        """One image -> score, threshold, normalised score, verdict, size, models, timing.
        `drift_profile=true` adds the image's patch-distance profile (for the batch job)."""
        return await self.endpoints.respond(ctx, self.endpoints.inspect(image, drift_profile))

    @bentoml.api
    async def heatmap(
        self,
        image: Path,
        ctx: bentoml.Context,
        output: str = "overlay",
        drift_profile: bool = False,
    ) -> Image.Image:
        """One image -> PNG `overlay`, 16-bit `map` (2 x threshold = 65535), or float32 `npy`;
        the X-Inspection header carries the /inspect JSON, so a client scores once."""
        work = self.endpoints.heatmap(image, output, drift_profile)
        return await self.endpoints.respond(ctx, work)

    @bentoml.api
    async def inspect_batch(self, images: list[Path], ctx: bentoml.Context) -> list[dict[str, Any]]:
        """Several images -> one result each, in order; a bad image gets an error entry."""
        return await self.endpoints.respond(ctx, self.endpoints.inspect_batch(images))

    @bentoml.api(route="/model_info")
    async def model_info(self) -> dict[str, Any]:
        return await self.endpoints.model_info()

    @bentoml.api(route="/drift")
    async def drift(self, reference: bool = False) -> dict[str, Any]:
        """Drift of recent traffic against the calibration images; `reference=true` adds the
        reference profiles."""
        return await self.endpoints.drift(reference)


# Key, size, queue and upload-shape checks before BentoML reads a body (detector/serving/gate.py).
InspectionAPI.add_asgi_middleware(RequestGate, settings=SETTINGS)
