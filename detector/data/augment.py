"""Augmented copies of the defect-free training images, for a memory bank that tolerates them.

A bank only knows the patches it was shown: if carpet can arrive rotated, the bank should
hold rotated carpet. Geometric variants (rotations, a horizontal flip) are enumerated, so
every image gets all of them; photometric jitter (brightness, contrast) is drawn per copy
from a seeded generator, so a fit is reproducible. Off by default (conf/augment/none.yaml):
augmentation multiplies the features to coreset and can hide real defects that look like a
rotated normal patch; docs/AUGMENTATION.md has the measurements.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance

from detector.data.shifts import rotation
from detector.images import read_image
from detector.provenance import image_name

QUARTER_TURNS = {
    90: Image.Transpose.ROTATE_90,
    180: Image.Transpose.ROTATE_180,
    270: Image.Transpose.ROTATE_270,
}


@dataclass(frozen=True)
class AugmentConfig:
    rotations: tuple[float, ...] = (0.0,)  # degrees; multiples of 90 are exact, others reflect
    hflip: bool = False
    brightness: float = 0.0  # gain drawn from [1 - b, 1 + b] per copy
    contrast: float = 0.0  # factor drawn from [1 - c, 1 + c] per copy
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "rotations", tuple(float(r) for r in self.rotations) or (0.0,))
        if not (0 <= self.brightness < 1 and 0 <= self.contrast < 1):
            raise ValueError("augment brightness and contrast must be in [0, 1)")

    @property
    def copies_per_image(self) -> int:
        return len(self.rotations) * (2 if self.hflip else 1)

    @property
    def enabled(self) -> bool:
        return self.copies_per_image > 1 or self.brightness > 0 or self.contrast > 0


def turn(image: Image.Image, degrees: float) -> Image.Image:
    quarter = QUARTER_TURNS.get(int(degrees) % 360) if float(degrees).is_integer() else None
    if quarter is not None:
        return image.transpose(quarter)
    if degrees % 360 == 0:
        return image
    return rotation(image, degrees, np.random.default_rng(0))


def augment(image: Image.Image, copy: int, config: AugmentConfig, draw: int) -> Image.Image:
    """Copy number `copy` of an image; `draw` seeds its photometric jitter."""
    flip, rotation_index = divmod(copy, len(config.rotations))
    out = turn(image, config.rotations[rotation_index])
    if flip:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if config.brightness or config.contrast:
        rng = np.random.default_rng([config.seed, draw])
        gain, factor = rng.uniform(-1, 1, 2) * (config.brightness, config.contrast) + 1.0
        out = ImageEnhance.Contrast(ImageEnhance.Brightness(out).enhance(gain)).enhance(factor)
    return out


class AugmentedImages(Sequence[Image.Image]):
    """All copies of all images, decoded lazily, so fitting keeps streaming in bounded memory.

    Item i is copy `i % copies` of image `i // copies`; the copies of one image are adjacent,
    so each file is decoded once.
    """

    def __init__(self, sources: Sequence[str | Path | Image.Image], config: AugmentConfig):
        self.sources = list(sources)
        self.config = config

    def __len__(self) -> int:
        return len(self.sources) * self.config.copies_per_image

    @functools.lru_cache(maxsize=1)  # noqa: B019 - one image, freed with the sequence
    def _original(self, index: int) -> Image.Image:
        source = self.sources[index]
        return source if isinstance(source, Image.Image) else read_image(source)

    def name_of(self, index: int) -> str:
        """Item `index` as explanations name it: its photo and which copy."""
        image_index, copy = divmod(index, self.config.copies_per_image)
        return f"{image_name(self.sources, image_index)} (copy {copy + 1})"

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if not -len(self) <= index < len(self):
            raise IndexError(index)
        index %= len(self)
        image_index, copy = divmod(index, self.config.copies_per_image)
        return augment(self._original(image_index), copy, self.config, index)
