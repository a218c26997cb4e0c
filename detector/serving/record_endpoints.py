"""The API's record endpoints: list, read, review, a record's image and its heatmap by the
live bank, and the threshold the reviews suggest. The database is read in worker threads,
never on the event loop."""

from __future__ import annotations

import io
from collections import OrderedDict
from typing import Any

import anyio
import numpy as np
from starlette.responses import Response

from detector.images import ALLOWED_FORMATS
from detector.serving.answers import Refusal, refused_answer
from detector.serving.params import only_fields, real_number
from detector.serving.records import Recorder
from detector.serving.settings import Settings

RECORDS_OFF = "Recording is off on this service (INSPECT_RECORDS=off)."


def image_media_type(data: bytes) -> str:
    """The media type of a kept image, from its header (Pillow reads no pixels here)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS) as image:
            return Image.MIME.get(image.format or "", "application/octet-stream")
    except (UnidentifiedImageError, OSError):
        return "application/octet-stream"


# A record redrawn for review: its overlay PNG, the headers it is sent with, and its
# explanation (detector.provenance), all by one bank version.
Redrawn = tuple[bytes, dict[str, str], dict[str, Any]]
EXPLANATION_BYTES = 8 << 10  # about what an explanation's two crops and words take


class RenderCache:
    """Records already redrawn for review, by (image hash, bank version), up to
    `max_bytes`: a reviewer paging back and forth, or a client asking again and again,
    costs one redraw per image and version, for the heatmap and the explanation alike."""

    def __init__(self, max_bytes: int = 32 << 20) -> None:
        self.max_bytes, self.used = max_bytes, 0
        self._items: OrderedDict[tuple[str, str], Redrawn] = OrderedDict()

    def get(self, key: tuple[str, str]) -> Redrawn | None:
        item = self._items.get(key)
        if item is not None:
            self._items.move_to_end(key)
        return item

    def put(self, key: tuple[str, str], item: Redrawn) -> None:
        size = len(item[0]) + EXPLANATION_BYTES
        if key in self._items or size > self.max_bytes:
            return
        self._items[key] = item
        self.used += size
        while self.used > self.max_bytes:
            _, (picture, _, _) = self._items.popitem(last=False)
            self.used -= len(picture) + EXPLANATION_BYTES


class RecordEndpoints:
    """A part of `InspectionEndpoints` (detector/serving/api.py)."""

    # Set by InspectionEndpoints, which also gives `_change` (a call to the runner),
    # `check_header` and `_picture`.
    runner: Any
    settings: Settings
    recorder: Recorder | None
    _runner_slots: anyio.Semaphore
    _renders: anyio.Semaphore
    _banks: dict[str, str]  # product -> the live bank tag last seen
    _rendered: RenderCache

    def _recorder(self) -> Recorder:
        if self.recorder is None:
            raise Refusal(404, "records_off", RECORDS_OFF)
        return self.recorder

    async def records(self, params: dict[str, str]) -> dict[str, Any]:
        return await anyio.to_thread.run_sync(self._recorder().list, params)

    async def review_summary(self) -> dict[str, Any]:
        return await anyio.to_thread.run_sync(self._recorder().summary)

    async def activity(self) -> dict[str, Any]:
        return await anyio.to_thread.run_sync(self._recorder().activity)

    async def record(self, record_id: str) -> dict[str, Any]:
        return await anyio.to_thread.run_sync(self._recorder().get, record_id)

    async def record_image(self, record_id: str) -> Response:
        _, data = await anyio.to_thread.run_sync(self._recorder().image, record_id)
        return Response(data, media_type=image_media_type(data))

    async def record_heatmap(self, record_id: str) -> Response:
        """The overlay of a record's kept image, drawn by its product's live bank; the
        X-Bank-Model header says which version that was (the decision's is in the record)."""
        picture, headers, _, hit = await self._redrawn(record_id)
        headers = {**headers, "X-Cache": "hit" if hit else "miss"}
        return Response(picture, media_type="image/png", headers=headers)

    async def record_explanation(self, record_id: str) -> dict[str, Any]:
        """A record's most anomalous region beside the nearest normal patch of its
        product's live bank (or why that cannot be shown), and which version that was."""
        _, headers, explanation, _ = await self._redrawn(record_id)
        return {"record": record_id, "bank": headers["X-Bank-Model"], **explanation}

    async def _redrawn(self, record_id: str) -> tuple[bytes, dict[str, str], dict[str, Any], bool]:
        """A record's kept image scored again by the live bank, drawn and explained; once
        per (image, bank version), then kept (`RenderCache`). The image is read only when
        the runner is ready for it, so waiting requests hold no image."""
        recorder = self._recorder()
        record = await anyio.to_thread.run_sync(recorder.get, record_id)
        bank = self._banks.get(record["product"])
        cached = self._rendered.get((record["image_sha256"], bank)) if bank else None
        if cached is not None:
            return (*cached, True)
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
        redrawn = (picture, headers, result["explanation"])
        self._banks.setdefault(record["product"], headers["X-Bank-Model"])
        self._rendered.put((record["image_sha256"], headers["X-Bank-Model"]), redrawn)
        return (*redrawn, False)

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
            raise Refusal(400, "bad_request", "label and note must be text.")
        recorder = self._recorder()
        return await anyio.to_thread.run_sync(recorder.review, record_id, label, note, who)
