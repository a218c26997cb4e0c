"""Ignore masks: regions of a product's frames that must never raise an alarm.

Fixtures, printed labels and the background around a part vary from frame to frame without
being defects. A mask image (white = inspect, black = ignore; any size, stretched over the
frame as the anomaly map is) is reduced to the product's patch grid once: a cell is
inspected when at least half of its pixels are white. Ignored cells leave the image score
and the map (they read 0 there), so they never flag a part. The drift profile keeps every
cell: its reference was measured over every cell, and a profile without the ignored ones
would differ from it for that reason alone (set-drift-reference measures it anew).

The grid-sized mask is kept in the bank version's bank.json (packed bits: a 228 x 342
tiled grid takes 13 KB), so a mask change is a version like any other, with history and
rollback, and a record's bank version says which mask decided it.
"""

from __future__ import annotations

import base64
import hashlib
from typing import Any

import numpy as np
from PIL import Image

from detector.errors import UserError
from detector.extractor import BackboneSpec
from detector.tiling import Tiling, layout

MASK_KEY = "inspect_mask"  # in bank.json


class MaskError(UserError):
    """A mask image that cannot be used (HTTP 400)."""

    status, reason = 400, "bad_mask"


def grid_shape(document: dict[str, Any]) -> tuple[int, int]:
    """(rows, columns) of the patch grid a bank's frames are scored on: the input's, or a
    tiled frame's."""
    spec = BackboneSpec.from_dict(document["extractor"])
    tiling = Tiling.from_metadata(document)
    if tiling is not None:
        return layout(tiling, spec).grid
    cells = spec.resolution // spec.patch_size
    return cells, cells


def mask_grid(image: Image.Image, shape: tuple[int, int]) -> np.ndarray:
    """(rows, columns) bools, True where inspected: at least half of the cell's pixels are
    white. Refused when it would inspect nothing."""
    grey = np.asarray(image.convert("L"), dtype=np.float32) / 255.0
    rows, columns = shape
    resized = Image.fromarray(grey).resize((columns, rows), Image.Resampling.BOX)
    inspected = np.asarray(resized) >= 0.5
    if not inspected.any():
        raise MaskError(
            "The mask ignores the whole frame: paint the regions to inspect white and "
            "those to ignore black."
        )
    return inspected


def to_document(inspected: np.ndarray) -> dict[str, Any]:
    """A mask as bank.json keeps it."""
    bits = base64.b64encode(np.packbits(inspected.ravel()).tobytes()).decode()
    return {
        "grid": list(inspected.shape),
        "bits": bits,
        "inspected_share": round(float(inspected.mean()), 4),
        "sha256": hashlib.sha256(bits.encode()).hexdigest()[:16],
    }


def from_document(document: dict[str, Any]) -> np.ndarray | None:
    """The mask a bank.json keeps (None: every patch is inspected)."""
    stored = document.get(MASK_KEY)
    if not stored:
        return None
    rows, columns = stored["grid"]
    packed = np.frombuffer(base64.b64decode(stored["bits"]), dtype=np.uint8)
    return np.unpackbits(packed)[: rows * columns].reshape(rows, columns).astype(bool)
