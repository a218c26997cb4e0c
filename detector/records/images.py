"""Inspected images kept by content: <root>/<first two hex digits>/<SHA-256 of the upload>.

What is kept is the image, not the uploaded bytes: the decoded pixels (EXIF orientation
applied, converted to 8-bit RGB, exactly what was scored) re-encoded losslessly as PNG.
Bytes appended after an image's end, metadata chunks and thumbnails are not kept, and
scoring the kept file gives the recorded score again (replay). The same image inspected
twice is stored once.

The folder never passes its size cap: a new image first makes room by removing the oldest
ones, and an image larger than the whole cap is not kept. Retention also removes images
past their age. A record keeps its `image_kept` flag (records are written once), and
whether its image is still here is read from the folder (`available`).
"""

from __future__ import annotations

import io
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from detector.files import write_atomic
from detector.images import DEFAULT_MAX_PIXELS, InvalidImageError, decode_image

log = logging.getLogger("inspection.records")

KEEP_POLICIES = ("flagged", "all", "none")


@dataclass
class Pruned:
    removed: int = 0
    freed_bytes: int = 0


def canonical_png(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> bytes:
    """The upload's pixels as the scorer saw them, as a PNG (zlib level 1: a flagged frame
    is encoded off the request path, but on the cores the backbone uses)."""
    image = decode_image(data, max_bytes=len(data), max_pixels=max_pixels)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


class ImageStore:
    def __init__(
        self,
        root: Path,
        keep: str = "flagged",
        max_age_days: float = 30,
        max_mb: float = 2048,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        if keep not in KEEP_POLICIES:
            raise ValueError(f"keep must be one of {', '.join(KEEP_POLICIES)}, not {keep!r}")
        self.root = Path(root)
        self.keep = keep
        self.max_age_s = max_age_days * 86400
        self.max_bytes = int(max_mb * 2**20)
        self.max_pixels = max_pixels
        self._total: int | None = None  # bytes in the folder, as this process last counted

    def wants(self, flagged: bool) -> bool:
        return self.keep == "all" or (self.keep == "flagged" and flagged)

    def path(self, sha256: str) -> Path:
        if len(sha256) != 64 or not all(c in "0123456789abcdef" for c in sha256):
            raise ValueError("not a SHA-256 hex digest")
        return self.root / sha256[:2] / sha256

    def put(self, sha256: str, data: bytes) -> bool | None:
        """Keep the upload's canonical image under the upload's hash (atomically: a reader
        never sees half a file), within the folder's cap. True: written now; False: kept
        already (its age is reset); None: not kept (not decodable, or larger than the cap).
        """
        target = self.path(sha256)
        if target.exists():
            os.utime(target)
            return False
        try:
            png = canonical_png(data, self.max_pixels)
        except InvalidImageError as error:
            log.warning("image %s not kept: %s", sha256, error)
            return None
        if len(png) > self.max_bytes:
            return None
        if self._total is None or self._total + len(png) > self.max_bytes:
            # Make room now, down to 90 % of the cap so the next images need no scan.
            self.prune(room_for=len(png) + self.max_bytes // 10)
        target.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(target, png, durable=False)  # a lost image is a record without one
        self._total = (self._total or 0) + len(png)
        return True

    def remove(self, sha256: str) -> None:
        """Forget an image kept for a record that was never written (dropped)."""
        try:
            path = self.path(sha256)
            size = path.stat().st_size
            path.unlink()
        except (OSError, ValueError):
            return
        if self._total is not None:
            self._total -= size

    def size(self, sha256: str) -> int | None:
        try:
            return self.path(sha256).stat().st_size
        except (OSError, ValueError):
            return None

    def get(self, sha256: str) -> bytes | None:
        try:
            return self.path(sha256).read_bytes()
        except (FileNotFoundError, ValueError):
            return None

    def available(self, sha256: str) -> bool:
        try:
            return self.path(sha256).is_file()
        except ValueError:
            return False

    def prune(self, now: float | None = None, room_for: int = 0) -> Pruned:
        """Remove images past the age limit, then the oldest until the total, plus
        `room_for` bytes, fits the cap."""
        now = time.time() if now is None else now
        files = []
        for folder in self.root.glob("??"):
            for path in folder.iterdir():
                if path.name.startswith("."):  # still being written
                    continue
                try:
                    stat = path.stat()
                except FileNotFoundError:
                    continue
                files.append((stat.st_mtime, stat.st_size, path))
        files.sort()
        total = sum(size for _, size, _ in files)
        limit = max(0, self.max_bytes - room_for)
        pruned = Pruned()
        for mtime, size, path in files:
            if now - mtime <= self.max_age_s and total <= limit:
                break
            path.unlink(missing_ok=True)
            total -= size
            pruned.removed += 1
            pruned.freed_bytes += size
        self._total = total
        return pruned
