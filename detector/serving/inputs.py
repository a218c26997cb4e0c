"""Uploads as backbone inputs: decoded with the service's limits, prepared for their product.

A product's extractor decides what an upload becomes: the whole frame resized to the input,
or a tiled product's scaled frame (detector.tiling). Uploads whose products feed the
backbone alike share one forward pass; a bad upload becomes its own error, never its batch's.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from PIL import Image

from detector.extractor import FeatureExtractor
from detector.images import InvalidImageError, decode_image
from detector.serving.settings import Settings
from detector.tiling import tiling_of

log = logging.getLogger("inspection")
Prepared = tuple[np.ndarray, tuple[int, int]]  # (backbone input, the image's width, height)


class UploadInputs:
    """Decodes and prepares uploads on a small pool of threads."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        # Pillow's decoders and resize release the GIL: a batch's uploads decode in parallel.
        self.pool = ThreadPoolExecutor(
            max_workers=settings.num_threads or 2, thread_name_prefix="decode"
        )

    def decode(self, upload: bytes) -> Image.Image | InvalidImageError:
        """Decode one upload with the service's limits; a bad one becomes its error."""
        try:
            return decode_image(
                upload, max_bytes=self.settings.max_bytes, max_pixels=self.settings.max_pixels
            )
        except InvalidImageError as error:
            return error
        except Exception as error:  # a decoder bug on one upload must not fail its batch-mates
            log.warning("could not decode an upload: %r", error)
            return InvalidImageError("corrupt", f"The image could not be decoded: {error}")

    def prepare(self, upload: bytes, extractor: FeatureExtractor) -> Prepared | InvalidImageError:
        """One upload decoded and prepared for `extractor` (its product's)."""
        image = self.decode(upload)
        if isinstance(image, InvalidImageError):
            return image
        return extractor.prepare(image), image.size

    def prepare_each(
        self, uploads: list[bytes], targets: list[FeatureExtractor | Exception]
    ) -> list[Prepared | Exception]:
        """Each upload for its extractor, in parallel; an upload already refused (its
        target is the refusal) stays refused, undecoded."""
        submit = self.pool.submit
        futures = [
            target if isinstance(target, Exception) else submit(self.prepare, data, target)
            for data, target in zip(uploads, targets, strict=True)
        ]
        return [item if isinstance(item, Exception) else item.result() for item in futures]

    def prepare_all(
        self, uploads: list[bytes], extractor: FeatureExtractor
    ) -> tuple[np.ndarray, list[tuple[int, int]]]:
        """Every upload as the backbone's input, with its size; one image decoded at a time
        and reduced at once, so a change of large frames holds one decoded frame, never
        several. The first image that fails to decode is raised."""
        prepared, sizes = [], []
        for upload in uploads:
            item = self.prepare(upload, extractor)
            if isinstance(item, InvalidImageError):
                raise item
            prepared.append(item[0])
            sizes.append(item[1])
        return np.stack(prepared), sizes


def by_input(rows: list[int], extractors: list[Any]) -> dict[Any, list[int]]:
    """Rows grouped by the backbone pass that serves them: untiled products on the shared
    backbone all share one pass, tiled ones one per tiling, and a product served by its own
    int8 graph (detector.quantized) one of its own."""
    groups: dict[Any, list[int]] = {}
    for row in rows:
        extractor = extractors[row]
        backbone = getattr(extractor, "inner", extractor)  # a tiled product's backbone
        groups.setdefault((id(backbone), tiling_of(extractor)), []).append(row)
    return groups
