"""Write a small seeded carpet-like dataset in exactly the MVTec AD layout.

MVTec AD cannot be downloaded everywhere, so tests and the demo use this: a basket-weave
texture with per-image jitter (so "normal" varies like a real line) and five defect kinds
with pixel masks: colour stain, cut, hole, loose thread and metal contamination.

    python -m detector synthetic-data OUT_ROOT [--category carpet] [--size 256] [--train 40] ...
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy.ndimage import gaussian_filter

DEFECTS = ("color", "cut", "hole", "thread", "metal_contamination")
Defect = Callable[[np.ndarray, np.random.Generator], tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class Session:
    """How one capture session of the line looks: the lamps (`gain`), the yarn lot's tone
    (`tone`, added to the base colour), and where the camera sits (`scale` of the weave,
    `angle` in degrees). Session 0 is the training session; later ones drift a little."""

    gain: float = 1.0
    tone: tuple[float, float, float] = (0.0, 0.0, 0.0)
    scale: float = 1.0
    angle: float = 0.0

    @classmethod
    def later(cls, number: int) -> Session:
        """Session `number`: each one 2 % brighter, a slightly warmer yarn, the camera 1 %
        closer and turned by half a degree more than the one before."""
        return cls(
            gain=1.0 + 0.02 * number,
            tone=(0.006 * number, 0.002 * number, -0.004 * number),
            scale=1.0 + 0.01 * number,
            angle=0.5 * number,
        )


def carpet_texture(
    size: int,
    rng: np.random.Generator,
    session: Session = Session(),
    period_px: float | None = None,
) -> np.ndarray:
    """A (size, size, 3) float image in [0, 1]: woven threads in alternating blocks, as
    captured in `session`. The weave's period is 1/15 of the frame, or `period_px` (a
    high-resolution frame of the same carpet: more periods, each as many px as before)."""
    blocks_across = rng.uniform(14.0, 16.0)
    period = (period_px or size / blocks_across) * session.scale
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    if session.angle:
        turn = np.deg2rad(session.angle)
        x, y = x * np.cos(turn) - y * np.sin(turn), x * np.sin(turn) + y * np.cos(turn)
    x += rng.uniform(0, period)
    y += rng.uniform(0, period)
    warp = 0.5 + 0.5 * np.cos(2 * np.pi * x / period * 2)
    weft = 0.5 + 0.5 * np.cos(2 * np.pi * y / period * 2)
    blocks = (np.floor(x / period) + np.floor(y / period)) % 2
    weave = np.where(blocks == 0, warp, weft)
    noise = rng.normal(0, 1, (size, size))
    noise = gaussian_filter(noise, sigma=0.8)
    intensity = 0.55 + 0.3 * weave + 0.04 * noise
    base = np.array([0.55, 0.42, 0.30]) + rng.normal(0, 0.015, 3) + np.array(session.tone)
    return np.clip(intensity[..., None] * base[None, None, :] * 1.3 * session.gain, 0, 1)


def _shape_mask(size: int, draw: Callable[[ImageDraw.ImageDraw], None]) -> np.ndarray:
    canvas = Image.new("L", (size, size), 0)
    draw(ImageDraw.Draw(canvas))
    return np.asarray(canvas) > 127


def _center(size: int, rng: np.random.Generator) -> tuple[float, float]:
    return tuple(rng.uniform(0.25 * size, 0.75 * size, 2))


def color_stain(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    size = image.shape[0]
    cx, cy = _center(size, rng)
    rx, ry = rng.uniform(0.07, 0.12, 2) * size
    mask = _shape_mask(size, lambda d: d.ellipse((cx - rx, cy - ry, cx + rx, cy + ry), fill=255))
    colour = np.array([0.75, 0.12, 0.15]) if rng.random() < 0.5 else np.array([0.15, 0.35, 0.7])
    luminance = image.mean(axis=2, keepdims=True)
    out = np.where(mask[..., None], 0.35 * luminance + 0.65 * colour, image)
    return out, mask


def cut(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    size = image.shape[0]
    cx, cy = _center(size, rng)
    angle = rng.uniform(0, np.pi)
    half = rng.uniform(0.12, 0.2) * size
    dx, dy = np.cos(angle) * half, np.sin(angle) * half
    width = max(2, int(size * 0.025))
    mask = _shape_mask(
        size, lambda d: d.line((cx - dx, cy - dy, cx + dx, cy + dy), fill=255, width=width)
    )
    out = np.where(mask[..., None], image * 0.25, image)
    return out, mask


def hole(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    size = image.shape[0]
    cx, cy = _center(size, rng)
    radius = rng.uniform(0.05, 0.09) * size
    mask = _shape_mask(
        size, lambda d: d.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=255)
    )
    floor = np.array([0.08, 0.07, 0.06]) + rng.normal(0, 0.02, image.shape)
    out = np.where(mask[..., None], floor, image)
    return out, mask


def thread(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    size = image.shape[0]
    cx, cy = _center(size, rng)
    t = np.linspace(-1, 1, 60)
    length = rng.uniform(0.2, 0.3) * size
    angle = rng.uniform(0, np.pi)
    wiggle = np.sin(t * rng.uniform(4, 7) + rng.uniform(0, 6)) * 0.06 * size
    xs = cx + np.cos(angle) * t * length / 2 - np.sin(angle) * wiggle
    ys = cy + np.sin(angle) * t * length / 2 + np.cos(angle) * wiggle
    points = list(zip(xs.tolist(), ys.tolist(), strict=True))
    width = max(2, int(size * 0.02))
    mask = _shape_mask(size, lambda d: d.line(points, fill=255, width=width, joint="curve"))
    out = np.where(mask[..., None], np.array([0.92, 0.88, 0.75]), image)
    return out, mask


def metal_contamination(
    image: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    size = image.shape[0]
    cx, cy = _center(size, rng)
    angles = np.sort(rng.uniform(0, 2 * np.pi, 7))
    radii = rng.uniform(0.03, 0.07, 7) * size
    polygon = list(
        zip(
            (cx + radii * np.cos(angles)).tolist(),
            (cy + radii * np.sin(angles)).tolist(),
            strict=True,
        )
    )
    mask = _shape_mask(size, lambda d: d.polygon(polygon, fill=255))
    y, x = np.mgrid[0:size, 0:size]
    shine = 0.55 + 0.35 * np.cos((x - cx + y - cy) / (0.02 * size))
    metal = np.stack([shine * 0.8, shine * 0.82, shine * 0.85], axis=-1)
    out = np.where(mask[..., None], metal, image)
    return out, mask


DEFECT_MAKERS: dict[str, Defect] = {
    "color": color_stain,
    "cut": cut,
    "hole": hole,
    "thread": thread,
    "metal_contamination": metal_contamination,
}


def _save(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((np.clip(array, 0, 1) * 255 + 0.5).astype(np.uint8)).save(path)


def make_dataset(
    root: str | Path,
    category: str = "carpet",
    *,
    size: int = 256,
    n_train: int = 40,
    n_test_good: int = 10,
    n_per_defect: int = 4,
    defects: tuple[str, ...] = DEFECTS,
    seed: int = 0,
    sessions: int = 1,
    n_calibration: int = 0,
    train_sessions: int = 1,
) -> Path:
    """Write the dataset under `root/category` and return that folder.

    With `sessions` > 1 the line drifts between capture sessions (`Session.later`): the
    training images come from session 0, `n_calibration` defect-free images of session 1
    go to `calibration/good` (for `data.calibration_dir`), and the test images come from
    the last session, as parts made on a later shift. With `train_sessions` > 1 the
    training images span sessions 0 .. train_sessions - 1, `n_train` in each, written to
    `train/good/s<k>/` (the layout `fit` reads sessions from).
    """
    rng = np.random.default_rng(seed)
    folder = Path(root) / category
    test_session = Session.later(sessions - 1) if sessions > 1 else Session()
    if train_sessions > 1:
        for k in range(train_sessions):
            for i in range(n_train):
                image = carpet_texture(size, rng, Session.later(k))
                _save(image, folder / "train" / "good" / f"s{k}" / f"{i:03d}.png")
    for i in range(n_train if train_sessions <= 1 else 0):
        _save(carpet_texture(size, rng), folder / "train" / "good" / f"{i:03d}.png")
    for i in range(n_calibration):
        image = carpet_texture(size, rng, Session.later(1) if sessions > 1 else Session())
        _save(image, folder / "calibration" / "good" / f"{i:03d}.png")
    for i in range(n_test_good):
        _save(carpet_texture(size, rng, test_session), folder / "test" / "good" / f"{i:03d}.png")
    for defect in defects:
        for i in range(n_per_defect):
            image, mask = DEFECT_MAKERS[defect](carpet_texture(size, rng, test_session), rng)
            _save(image, folder / "test" / defect / f"{i:03d}.png")
            _save(mask.astype(np.float64), folder / "ground_truth" / defect / f"{i:03d}_mask.png")
    return folder
