"""Inspected images kept by content: <root>/<first two hex digits>/<SHA-256>.

The same image inspected twice is stored once. Retention removes the oldest files first,
by age and then by the folder's total size; a record keeps its `image_kept` flag (records
are written once), and whether its image is still here is read from the folder
(`available`).
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

KEEP_POLICIES = ("flagged", "all", "none")


@dataclass
class Pruned:
    removed: int = 0
    freed_bytes: int = 0


class ImageStore:
    def __init__(
        self, root: Path, keep: str = "flagged", max_age_days: float = 30, max_mb: float = 2048
    ) -> None:
        if keep not in KEEP_POLICIES:
            raise ValueError(f"keep must be one of {', '.join(KEEP_POLICIES)}, not {keep!r}")
        self.root = Path(root)
        self.keep = keep
        self.max_age_s = max_age_days * 86400
        self.max_bytes = int(max_mb * 2**20)

    def wants(self, flagged: bool) -> bool:
        return self.keep == "all" or (self.keep == "flagged" and flagged)

    def path(self, sha256: str) -> Path:
        if len(sha256) != 64 or not all(c in "0123456789abcdef" for c in sha256):
            raise ValueError("not a SHA-256 hex digest")
        return self.root / sha256[:2] / sha256

    def put(self, sha256: str, data: bytes) -> None:
        """Store the bytes under their hash (atomically: a reader never sees half a file);
        an image already here only has its age reset."""
        target = self.path(sha256)
        if target.exists():
            os.utime(target)
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(
            dir=target.parent, prefix=".incoming-", delete=False
        ) as handle:
            handle.write(data)
        os.replace(handle.name, target)

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

    def prune(self, now: float | None = None) -> Pruned:
        """Remove images past the age limit, then the oldest until the total fits."""
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
        pruned = Pruned()
        for mtime, size, path in files:
            if now - mtime <= self.max_age_s and total <= self.max_bytes:
                break
            path.unlink(missing_ok=True)
            total -= size
            pruned.removed += 1
            pruned.freed_bytes += size
        return pruned
