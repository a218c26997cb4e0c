"""What a batch job writes in OUT, named per shard, and the lock that keeps one job per OUT
(a replacement pod while the old one terminates stops with one sentence instead of
interleaving rows)."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from batch.files import Shard
from batch.scorers import BatchSetupError, OutputBusyError


@dataclass(frozen=True)
class Outputs:
    """The files of one job (one shard) in OUT."""

    out_dir: Path
    suffix: str = ""

    @classmethod
    def of(cls, out_dir: Path, shard: Shard | None) -> Outputs:
        return cls(out_dir, shard.suffix if shard else "")

    def _named(self, stem: str, extension: str = "") -> Path:
        return self.out_dir / f"{stem}{self.suffix}{extension}"

    @property
    def journal(self) -> Path:
        return self._named("results", ".jsonl")

    @property
    def csv(self) -> Path:
        return self._named("results", ".csv")

    @property
    def summary(self) -> Path:
        return self._named("summary", ".json")

    @property
    def scores_plot(self) -> Path:
        return self._named("scores", ".png")

    @property
    def drift_reference(self) -> Path:
        return self._named("drift_reference", ".json")

    @property
    def evaluation(self) -> Path:
        return self._named("evaluation")

    @property
    def lock(self) -> Path:
        return self._named(".lock")


def heatmap_path(out_dir: Path, relative: str) -> Path:
    """OUT/heatmaps/<relative path>.png (a.jpg -> a.jpg.png, so a.png and a.jpg never share
    a file), refusing any path that would leave OUT."""
    base = (out_dir / "heatmaps").resolve()
    target = (base / f"{relative}.png").resolve()
    if not target.is_relative_to(base):
        raise ValueError(f"{relative} would be written outside {base}")
    return target


def check_writable(out_dir: Path) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".write-test-{os.getpid()}"  # unique: shards share OUT
        probe.write_text("ok")
        probe.unlink()
    except OSError as error:
        raise BatchSetupError(
            f"Cannot write to {out_dir}: {error.strerror}; choose another --out."
        ) from None


@contextmanager
def locked(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive lock on `lock_path` for the block, or stop with one sentence."""
    handle = lock_path.open("a+")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise OutputBusyError(
                f"Another batch job ({holder}) is writing to {lock_path.parent}: wait for it to "
                "finish or choose another --out."
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {os.uname().nodename}\n")
        handle.flush()
        yield
    finally:
        handle.close()  # closing releases the lock
