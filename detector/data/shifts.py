"""Controlled, seeded image shifts that imitate a production line changing under the detector.

Each shift takes one physical parameter (a gain, a blur radius, a JPEG quality, ...), so a
severity scale is just a list of parameters in the Hydra config (conf/drift.yaml) and the
report can say exactly what "severity 3" meant. Geometric shifts fill the border by
reflection: a moved camera sees more of the same surface, not black corners that would be
an anomaly of their own.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

Shift = Callable[[Image.Image, float, np.random.Generator], Image.Image]
# A blur radius is given for a 256 px image and scaled to the image's size, so a severity
# means the same on a 128 px test image and a 1024 px MVTec frame.
REFERENCE_SIDE = 256.0


def _side_scale(image: Image.Image) -> float:
    return min(image.size) / REFERENCE_SIDE


def _reflect_padded(image: Image.Image) -> tuple[Image.Image, int, int]:
    """The image mirrored on every side by half its size, and the offsets of the original."""
    array = np.asarray(image)
    pad_y, pad_x = array.shape[0] // 2, array.shape[1] // 2
    padded = np.pad(array, ((pad_y, pad_y), (pad_x, pad_x), (0, 0)), mode="reflect")
    return Image.fromarray(padded), pad_x, pad_y


def brightness(image: Image.Image, gain: float, rng: np.random.Generator) -> Image.Image:
    """Exposure change: every pixel multiplied by `gain` (1 = unchanged)."""
    return ImageEnhance.Brightness(image).enhance(gain)


def contrast(image: Image.Image, factor: float, rng: np.random.Generator) -> Image.Image:
    """Pixels pulled towards (factor < 1) or pushed from (factor > 1) the mean grey."""
    return ImageEnhance.Contrast(image).enhance(factor)


def blur(image: Image.Image, radius: float, rng: np.random.Generator) -> Image.Image:
    """Defocus: Gaussian blur of `radius` pixels of a 256 px image."""
    return image.filter(ImageFilter.GaussianBlur(radius * _side_scale(image)))


def noise(image: Image.Image, sigma: float, rng: np.random.Generator) -> Image.Image:
    """Sensor noise: additive Gaussian noise with std `sigma` grey levels (of 255), seeded."""
    array = np.asarray(image, dtype=np.float32)
    noisy = array + rng.normal(0.0, sigma, array.shape).astype(np.float32)
    return Image.fromarray(np.clip(np.rint(noisy), 0, 255).astype(np.uint8))


def jpeg(image: Image.Image, quality: float, rng: np.random.Generator) -> Image.Image:
    """Compression: a round trip through JPEG at `quality` (1..95)."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=int(round(quality)))
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return decoded.convert("RGB")


def rotation(image: Image.Image, degrees: float, rng: np.random.Generator) -> Image.Image:
    """Part or camera rotated by `degrees` counter-clockwise about the centre."""
    padded, pad_x, pad_y = _reflect_padded(image)
    turned = padded.rotate(degrees, resample=Image.Resampling.BILINEAR)
    return turned.crop((pad_x, pad_y, pad_x + image.width, pad_y + image.height))


def scale(image: Image.Image, zoom: float, rng: np.random.Generator) -> Image.Image:
    """Camera moved closer (zoom > 1) or further (zoom < 1); the frame keeps its size."""
    padded, pad_x, pad_y = _reflect_padded(image)
    width, height = image.width / zoom, image.height / zoom
    left = pad_x + (image.width - width) / 2
    top = pad_y + (image.height - height) / 2
    box = (left, top, left + width, top + height)
    return padded.resize(image.size, Image.Resampling.BILINEAR, box=box)


def color_cast(image: Image.Image, strength: float, rng: np.random.Generator) -> Image.Image:
    """Warmer lighting: red gains `strength`, blue loses it (0.1 = +10 % red, -10 % blue)."""
    array = np.asarray(image, dtype=np.float32)
    gains = np.array([1.0 + strength, 1.0, 1.0 - strength], dtype=np.float32)
    return Image.fromarray(np.clip(np.rint(array * gains), 0, 255).astype(np.uint8))


def camera_shift(image: Image.Image, fraction: float, rng: np.random.Generator) -> Image.Image:
    """Camera moved sideways and down by `fraction` of the frame's width and height."""
    padded, pad_x, pad_y = _reflect_padded(image)
    dx, dy = int(round(fraction * image.width)), int(round(fraction * image.height))
    dx, dy = min(dx, pad_x), min(dy, pad_y)
    left, top = pad_x + dx, pad_y + dy
    return padded.crop((left, top, left + image.width, top + image.height))


SHIFTS: dict[str, Shift] = {
    "brightness": brightness,
    "contrast": contrast,
    "blur": blur,
    "noise": noise,
    "jpeg": jpeg,
    "rotation": rotation,
    "scale": scale,
    "color_cast": color_cast,
    "camera_shift": camera_shift,
}


def apply_shift(image: Image.Image, name: str, parameter: float, seed: int = 0) -> Image.Image:
    """`image` as the line would show it after shift `name` with `parameter`; seeded."""
    if name not in SHIFTS:
        raise ValueError(f"unknown shift {name!r}: choose one of {', '.join(SHIFTS)}")
    shifted = SHIFTS[name](image.convert("RGB"), float(parameter), np.random.default_rng(seed))
    return shifted.convert("RGB")
