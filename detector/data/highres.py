"""A synthetic high-resolution set: large carpet frames with small defects, in the MVTec layout.

The weave keeps its native scale (about 17 px per period, as in the 256-px set), so a
2048-px frame holds eight times as many threads across, and the defects are 6-20 px wide:
resized to a 448-px backbone input they shrink to 1-4 px, a fraction of one 16-px patch.
This is the case tiling (detector/tiling.py) is for; `benchmarks.tiling_benchmark`
measures it.

The `labelled` variant (category carpet_highres_label) prints a label on every frame, in the
same place with different marks each time: defect-like to the bank, and no defect. Its
`ignore_mask.png` (white = inspect) is the mask a user would draw for it (detector.masks).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from detector.data.synthetic import _save, carpet_texture

CATEGORY = "carpet_highres"
LABELLED = "carpet_highres_label"
MASK_FILE = "ignore_mask.png"
PERIOD_PX = 256 / 15  # the 256-px set's weave period, in px
SMALL_DEFECTS = ("spot", "scratch")


def small_defect(
    image: np.ndarray, kind: str, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """`image` with one small dark defect (a 6-20 px spot, or a 2-3 px wide scratch 12-20 px
    long) away from the border, and its mask."""
    size = image.shape[0]
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    x, y = rng.uniform(0.1, 0.9, 2) * size
    if kind == "spot":
        radius = rng.uniform(3, 10)
        draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=255)
    else:
        length, angle = rng.uniform(12, 20), rng.uniform(0, np.pi)
        dx, dy = np.cos(angle) * length / 2, np.sin(angle) * length / 2
        draw.line((x - dx, y - dy, x + dx, y + dy), fill=255, width=int(rng.integers(2, 4)))
    mask = np.asarray(canvas) > 0
    darker = image.copy()
    darker[mask] *= rng.uniform(0.25, 0.45)
    return darker, mask


def label_box(size: int) -> tuple[int, int, int, int]:
    """Where the label sits: (left, top, right, bottom), the top-left eighth of the frame."""
    return size // 16, size // 16, size // 16 + size // 5, size // 16 + size // 10


def printed_label(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """`image` with a white label of random dark marks (a batch number, a date) in
    `label_box`: the marks differ on every frame."""
    size = image.shape[0]
    left, top, right, bottom = label_box(size)
    canvas = Image.fromarray((image * 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    draw.rectangle((left, top, right, bottom), fill=(245, 245, 240))
    stroke = max(1, size // 400)
    for _ in range(int(rng.integers(6, 12))):
        x, y = rng.uniform(left + 4, right - 12), rng.uniform(top + 4, bottom - 12)
        w, h = rng.uniform(4, size / 60, 2)
        draw.rectangle((x, y, x + w, y + h), outline=(30, 30, 30), width=stroke)
    return np.asarray(canvas, dtype=np.float64) / 255


def make_highres_dataset(
    root: str | Path,
    *,
    size: int = 2048,
    n_train: int = 10,
    n_test_good: int = 10,
    n_per_defect: int = 5,
    seed: int = 0,
    labelled: bool = False,
) -> Path:
    """Write `root/carpet_highres` (train/good, test/good, test/<defect>, ground_truth), or
    with `labelled` `root/carpet_highres_label` and its ignore_mask.png."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / (LABELLED if labelled else CATEGORY)

    def frame() -> np.ndarray:
        image = carpet_texture(size, rng, period_px=PERIOD_PX)
        return printed_label(image, rng) if labelled else image

    if labelled:
        mask = np.ones((size, size))
        left, top, right, bottom = label_box(size)
        mask[top - 8 : bottom + 9, left - 8 : right + 9] = 0  # the label and a margin
        _save(mask, folder / MASK_FILE)

    for i in range(n_train):
        _save(frame(), folder / "train" / "good" / f"{i:03d}.png")
    for i in range(n_test_good):
        _save(frame(), folder / "test" / "good" / f"{i:03d}.png")
    for kind in SMALL_DEFECTS:
        for i in range(n_per_defect):
            image, mask = small_defect(frame(), kind, rng)
            _save(image, folder / "test" / kind / f"{i:03d}.png")
            _save(mask.astype(np.float64), folder / "ground_truth" / kind / f"{i:03d}_mask.png")
    return folder
