"""Decode untrusted image bytes or files into RGB Pillow images, or say clearly why not.

The service, the batch job and the dataset reader all go through here, so a camera frame
that is 16-bit, CMYK or palette-based is converted the same way everywhere, and a bad
upload becomes an `InvalidImageError` with an HTTP status instead of a crash.
"""

from __future__ import annotations

import io
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from detector.errors import UserError

DEFAULT_MAX_BYTES = 50 * 1024 * 1024
DEFAULT_MAX_PIXELS = 40_000_000
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"})
# The only decoders untrusted bytes may reach: what cameras and image tools write. Pillow
# would otherwise also try GIF, ICO, PCX, TGA, SGI, DDS, IM, QOI, XBM and more, each C
# decoder one more place for a malformed file to find a bug.
ALLOWED_FORMATS = ("PNG", "JPEG", "BMP", "TIFF", "WEBP")
# Full scale of integer greyscale modes by bit depth: one bright pixel must not change what
# every other pixel means (scaling by the image's own maximum did).
FULL_SCALE = {"I;16": 65535.0, "I;16B": 65535.0, "I;16L": 65535.0, "I": 4294967295.0}


@dataclass
class InvalidImageError(ValueError):
    """An input that cannot be inspected; `status` is the HTTP code a service should answer."""

    reason: str
    message: str
    status: int = 400

    def __str__(self) -> str:
        return self.message


def _to_8bit_rgb(image: Image.Image) -> Image.Image:
    """Convert any still-image mode to 8-bit RGB without clipping high-bit-depth data.

    Integer greyscale is scaled by its bit depth (16-bit: 65535 is white; 32-bit: 2^32 - 1),
    float greyscale is taken as 0..1.
    """
    if image.mode in (*FULL_SCALE, "F"):
        array = np.asarray(image, dtype=np.float64)
        top = 1.0 if image.mode == "F" else FULL_SCALE[image.mode]
        gray = np.clip(np.nan_to_num(array) / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # Flatten transparency onto white instead of the arbitrary colour hidden under alpha.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


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
    image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
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
            "The upload is not an image in an accepted format (PNG, JPEG, BMP, TIFF, WebP).",
            status=415,
        ) from None
    except Exception as error:  # any decoder failure (TypeError, struct.error, ...) is the file's
        raise InvalidImageError(
            "corrupt", f"The image file is corrupt or truncated: {error}", status=400
        ) from None


def check_image_header(
    data: bytes,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> tuple[int, int]:
    """Reject what can be rejected without decoding pixels (not an image, too big, animated);
    returns the (width, height) the header declares.

    The service's API runs this so that such uploads never reach the scoring runner; the
    runner then decodes with `decode_image`, which repeats these checks and finds the rest
    (truncated or corrupt pixel data).
    """
    return _checked(data, max_bytes, max_pixels, load=False).size


def decode_image(
    data: bytes,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    reduce_to: tuple[int, int] | None = None,
) -> Image.Image:
    """Decode bytes into a fully loaded RGB image, raising `InvalidImageError` on bad input.

    The EXIF orientation is applied here, the one decoding path of fit, evaluate, the
    service and the batch job, so a phone photo is the same way up everywhere (and as a
    browser shows it). `reduce_to` (width, height) is for pictures, not scoring: a JPEG is
    then decoded at a reduced scale and the result shrunk to fit that size.
    """
    image = _checked(data, max_bytes, max_pixels, load=False)
    try:
        if reduce_to:
            side = min(reduce_to)  # either orientation: EXIF may swap the axes below
            image.draft("RGB", (side, side))
        image.load()
        ImageOps.exif_transpose(image, in_place=True)  # no copy of a 40 MP frame
    except Exception as error:  # a decoder or EXIF failure is the file's problem, not ours
        raise InvalidImageError(
            "corrupt", f"The image file is corrupt or truncated: {error}", status=400
        ) from None
    rgb = _to_8bit_rgb(image)
    if reduce_to:
        rgb.thumbnail(reduce_to, Image.Resampling.BILINEAR)
    return rgb


def read_image(
    path: str | Path, *, max_bytes: int = DEFAULT_MAX_BYTES, max_pixels: int = DEFAULT_MAX_PIXELS
) -> Image.Image:
    """Read an image file through the same checks as an upload; its size is checked before
    a byte is read, and only a regular file is read (a FIFO would block forever)."""
    try:
        info = Path(path).stat()
        if not stat.S_ISREG(info.st_mode):
            raise InvalidImageError("not_a_file", f"{path} is not a regular file.")
        if info.st_size > max_bytes:
            raise InvalidImageError(
                "too_large",
                f"{path} is {info.st_size} bytes; the limit is {max_bytes} bytes.",
                status=413,
            )
        data = Path(path).read_bytes()
    except OSError as error:
        raise InvalidImageError("unreadable", f"Cannot read {path}: {error.strerror}.") from None
    return decode_image(data, max_bytes=max_bytes, max_pixels=max_pixels)


def is_image_path(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def images_in(folder: Path, allow_empty: bool = False) -> list[Path]:
    """The images directly in a folder, sorted by name; a missing folder (or an empty one,
    unless `allow_empty`) is one sentence. (The batch job walks a tree: batch/files.py.)"""
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder of images.")
    paths = sorted(p for p in folder.iterdir() if p.is_file() and is_image_path(p))
    if not paths and not allow_empty:
        raise UserError(f"{folder} holds no images.")
    return paths
