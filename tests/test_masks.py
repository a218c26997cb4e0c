"""Ignore masks: a defect in an ignored region never flags a part, one outside it does, and a
mask is a bank version like any other (history, rollback)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from detector.banks.models import load_pair
from detector.data.mvtec import MVTecCategory
from detector.masks import MaskError, from_document, mask_grid, to_document
from devtools.in_process import bentoml_home, run_detector

LINE_KEY, ADMIN_KEY = "mask-line-key-0123456789", "mask-admin-key-0123456789"
LINE, ADMIN = {"X-API-Key": LINE_KEY}, {"X-API-Key": ADMIN_KEY}


def blotted(source: Path, left: int) -> Image.Image:
    """A defect-free test image with a dark 36-px square whose left edge is at `left`."""
    pixels = np.asarray(Image.open(source).convert("RGB")).copy()
    pixels[46:82, left : left + 36] = 0
    return Image.fromarray(pixels)


def verdicts(home: Path, images: list[Image.Image]) -> list[bool]:
    with bentoml_home(home):
        detector = load_pair(product="carpet", device="cpu").detector
        return [r.is_anomalous for r in detector.predict(images, with_maps=False)]


def test_a_mask_reduces_to_the_grid_by_majority_and_round_trips() -> None:
    mask = np.full((100, 200), 255, np.uint8)
    mask[:, :120] = 0  # 60 % of the width ignored
    grid = mask_grid(Image.fromarray(mask), (4, 10))
    assert grid[:, :6].sum() == 0 and grid[:, 6:].all()
    assert (from_document({"inspect_mask": to_document(grid)}) == grid).all()
    assert to_document(grid)["inspected_share"] == 0.4
    with pytest.raises(MaskError, match="ignores the whole frame"):
        mask_grid(Image.new("L", (50, 50), 0), (4, 4))


def test_an_ignored_region_never_flags_and_rollback_restores_the_old_verdicts(
    store_copy: Callable[[Path], Path], synthetic_dataset: MVTecCategory, tmp_path: Path
) -> None:
    home = store_copy(tmp_path / "home")
    good = next(s.path for s in synthetic_dataset.test_samples() if s.label == 0)
    parts = [blotted(good, left=8), blotted(good, left=84), Image.open(good).convert("RGB")]
    assert verdicts(home, parts) == [True, True, False]
    mask = np.full((128, 128), 255, np.uint8)
    mask[:, :56] = 0  # a fixture on the left: never inspected
    Image.fromarray(mask).save(tmp_path / "mask.png")
    command = ["set-mask", "carpet", str(tmp_path / "mask.png"), "--reason", "fixture"]
    changed = run_detector(home, *command)
    assert changed.returncode == 0, changed.stderr[-2000:]
    report = json.loads(changed.stdout)
    assert report["inspected_share_before"] == 1.0 and 0.5 < report["inspected_share_after"] < 0.6
    assert verdicts(home, parts) == [False, True, False]
    with bentoml_home(home):
        (flagged,) = load_pair(product="carpet", device="cpu").detector.predict(parts[:1])
    # The ignored region reads 0 on the map (its edge is blurred with its neighbours').
    assert flagged.anomaly_map[:, :32].max() < 1e-3 * flagged.anomaly_map.max()
    listing = run_detector(home, "products", "carpet", "--json")
    history = json.loads(listing.stdout)
    assert (
        history[-1]["change"]["action"] == "mask" and history[-1]["change"]["reason"] == "fixture"
    )
    rolled = run_detector(home, "rollback", "carpet", history[-2]["version"], "--reason", "undo")
    assert rolled.returncode == 0, rolled.stderr[-2000:]
    assert verdicts(home, parts) == [True, True, False]
    cleared = run_detector(home, "set-mask", "carpet", "--clear")
    assert cleared.returncode == 0 and json.loads(cleared.stdout)["inspected_share_after"] == 1.0
    empty = tmp_path / "black.png"
    Image.new("L", (64, 64), 0).save(empty)
    refused = run_detector(home, "set-mask", "carpet", str(empty))
    assert refused.returncode == 2 and "ignores the whole frame" in refused.stderr
