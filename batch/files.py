"""Find the images of a folder and take this job's deterministic shard of them.

Shards are chosen by a hash of each file's relative path, not its position in a listing, so
a file stays in the same shard when other files are added or removed between re-runs.
"""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from detector.images import is_image_path


@dataclass(frozen=True)
class Shard:
    index: int
    count: int

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise ValueError(f"shard {self.index}/{self.count}: need 0 <= index < count")

    @classmethod
    def parse(cls, text: str) -> Shard:
        """'I/N' with 0-based I, as Cloud Run's and Kubernetes' task indexes are."""
        try:
            index, count = (int(part) for part in text.split("/"))
        except ValueError:
            raise ValueError(f"--shard takes I/N (e.g. 0/4), got {text!r}") from None
        return cls(index, count)

    @classmethod
    def from_environment(cls) -> Shard | None:
        """Cloud Run Jobs and Kubernetes Indexed Jobs say which task this is."""
        if "CLOUD_RUN_TASK_INDEX" in os.environ:
            return cls(
                int(os.environ["CLOUD_RUN_TASK_INDEX"]),
                int(os.environ.get("CLOUD_RUN_TASK_COUNT", "1")),
            )
        if "JOB_COMPLETION_INDEX" in os.environ:
            # Kubernetes sets only the index; the job manifest passes the count (completions).
            count = os.environ.get("BATCH_SHARD_COUNT") or os.environ.get("JOB_COMPLETIONS")
            if not count:
                raise ValueError(
                    "JOB_COMPLETION_INDEX is set but not the shard count: set BATCH_SHARD_COUNT "
                    "to the Job's completions."
                )
            return cls(int(os.environ["JOB_COMPLETION_INDEX"]), int(count))
        return None

    def owns(self, relative_path: str) -> bool:
        digest = hashlib.sha1(relative_path.encode("utf-8")).digest()
        return int.from_bytes(digest[:8], "big") % self.count == self.index

    @property
    def suffix(self) -> str:
        return f"-shard-{self.index:04d}-of-{self.count:04d}"


@dataclass
class Listing:
    """What a folder holds, as sorted relative POSIX paths."""

    images: list[str]
    others: list[str]  # regular files that are not images: reported, not scored
    skipped: list[str]  # FIFOs, devices, sockets, links leaving INPUT, broken links


def find_images(root: Path, exclude: Path | None = None) -> Listing:
    """Images under `root`, recognised by extension, case-insensitively.

    Only regular files inside `root` are read: a FIFO would block the job forever and a
    link could point anywhere on the machine, so both are listed as skipped. `exclude` (the
    job's own output folder, when it lies inside the input) is never walked.
    """
    root = root.resolve()
    excluded = exclude.resolve() if exclude else None
    images, others, skipped = [], [], []
    for folder, subfolders, names in os.walk(root):
        here = Path(folder)
        subfolders[:] = sorted(
            name for name in subfolders if excluded is None or here / name != excluded
        )
        for name in names:
            path = here / name
            relative = path.relative_to(root).as_posix()
            try:
                target = path.resolve(strict=True)
                regular = stat.S_ISREG(target.stat().st_mode)
            except OSError:  # a broken link
                skipped.append(relative)
                continue
            if not regular or not target.is_relative_to(root):
                skipped.append(relative)
            elif excluded is not None and target.is_relative_to(excluded):
                continue
            else:
                (images if is_image_path(path) else others).append(relative)
    return Listing(sorted(images), sorted(others), sorted(skipped))
