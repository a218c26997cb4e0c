"""Decode untrusted image bytes or files into RGB Pillow images, or say clearly why not.

The service, the batch job and the dataset reader all go through here, so a camera frame
that is 16-bit, CMYK or palette-based is converted the same way everywhere, and a bad
upload becomes an `InvalidImageError` with an HTTP status instead of a crash.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

DEFAULT_MAX_BYTES = 50 * 1024 * 1024
DEFAULT_MAX_PIXELS = 40_000_000
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"})


@dataclass
class InvalidImageError(ValueError):
    """An input that cannot be inspected; `status` is the HTTP code a service should answer."""

    reason: str
    message: str
    status: int = 400

    def __str__(self) -> str:
        return self.message


def _to_8bit_rgb(image: Image.Image) -> Image.Image:
    """Convert any still-image mode to 8-bit RGB without clipping high-bit-depth data."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        # 16-bit sensors store 0..65535; a plain convert("RGB") would clip them to white.
        top = 65535.0 if array.max(initial=0) > 255 or image.mode.startswith("I;16") else 255.0
        gray = np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # Flatten transparency onto white instead of the arbitrary colour hidden under alpha.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _open_checked(data: bytes, max_bytes: int, max_pixels: int) -> Image.Image:
    """Open (header only, no pixel data) and apply every check that needs no decoding."""
    if not data:
        raise InvalidImageError("empty", "The upload is empty: send the bytes of an image file.")
    if len(data) > max_bytes:
        raise InvalidImageError(
            "too_large",
            f"The upload is {len(data)} bytes; the limit is {max_bytes} bytes.",
            status=413,
        )
    image = Image.open(io.BytesIO(data))
    width, height = image.size
    if width * height > max_pixels:
        raise InvalidImageError(
            "too_many_pixels",
            f"The image is {width}x{height} pixels; the limit is {max_pixels} pixels.",
            status=413,
        )
    if getattr(image, "n_frames", 1) > 1:
        raise InvalidImageError(
            "animated",
            "Animated or multi-frame images are not inspected: send one still frame.",
            status=415,
        )
    return image


def _checked(data: bytes, max_bytes: int, max_pixels: int, load: bool) -> Image.Image:
    """`_open_checked`, then (with `load`) the pixel data, with Pillow's errors translated."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = _open_checked(data, max_bytes, max_pixels)
            if load:
                image.load()
            return image
    except InvalidImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise InvalidImageError(
            "too_many_pixels", f"The image is too large to decode safely: {error}", status=413
        ) from None
    except UnidentifiedImageError:
        raise InvalidImageError(
            "not_an_image",
            "The upload is not an image Pillow can read (PNG, JPEG, BMP, TIFF, WebP).",
            status=415,
        ) from None
    except (OSError, SyntaxError, ValueError) as error:
        raise InvalidImageError(
            "corrupt", f"The image file is corrupt or truncated: {error}", status=400
        ) from None


def check_image_header(
    data: bytes,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> None:
    """Reject what can be rejected without decoding pixels (not an image, too big, animated).

    The service's API runs this so that such uploads never reach the scoring runner; the
    runner then decodes with `decode_image`, which repeats these checks and finds the rest
    (truncated or corrupt pixel data).
    """
    _checked(data, max_bytes, max_pixels, load=False)


def decode_image(
    data: bytes,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Image.Image:
    """Decode bytes into a fully loaded RGB image, raising `InvalidImageError` on bad input."""
    return _to_8bit_rgb(_checked(data, max_bytes, max_pixels, load=True))


def read_image(path: str | Path, **limits: int) -> Image.Image:
    """Read an image file through the same checks as an upload."""
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise InvalidImageError("unreadable", f"Cannot read {path}: {error.strerror}.") from None
    return decode_image(data, **limits)


def is_image_path(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS
