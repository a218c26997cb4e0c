"""A product's ignore mask set or cleared: a new version, like every change to a bank
(detector.banks.changes has the others; detector.masks says what a mask does)."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import bentoml
from PIL import Image

from detector.banks.products import UnknownProductError, list_products
from detector.banks.versions import Draft, commit_version, verify
from detector.masks import MASK_KEY, grid_shape, mask_grid, to_document
from detector.memory_bank import MemoryBank


def set_mask(
    product: str, mask: Image.Image | None, reason: str = ""
) -> tuple[bentoml.Model, dict[str, Any]]:
    """A new live version whose frames are inspected only where `mask` is white (None:
    everywhere again). The bank rows, threshold and calibration scores are kept, and the
    change says they were measured over every patch: under a mask a frame's score is taken
    over fewer patches (with the max rule it can only fall; with the top-percent rule it
    may move either way a little). A later calibration session (add-images --session
    ... --join calibration) restates the false-alarm rate under the mask."""
    report: dict[str, Any] = {}

    def make(parent: bentoml.Model | None) -> Draft:
        if parent is None:
            raise UnknownProductError(product, list_products())
        verify(parent)
        document = MemoryBank.read_document(parent.path)
        before = (document.get(MASK_KEY) or {}).get("inspected_share", 1.0)
        if mask is None:
            document.pop(MASK_KEY, None)
        else:
            document[MASK_KEY] = to_document(mask_grid(mask, grid_shape(document)))
        after = (document.get(MASK_KEY) or {}).get("inspected_share", 1.0)
        folder = MemoryBank.write_document(Path(scratch) / "bank", document)
        report.update(inspected_share_before=before, inspected_share_after=after)
        change = {
            "action": "mask",
            "reason": reason,
            "inspected_share": after,
            "calibration": "measured over every patch, before this mask",
        }
        return Draft(folder, change, index_of=parent)

    with tempfile.TemporaryDirectory(prefix="mask-") as scratch:
        model = commit_version(product, make)
    return model, {"product": product, "version": str(model.tag.version), **report}
