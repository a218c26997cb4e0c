"""Files that many processes share: written whole or not at all, and one writer at a time.

Bank versions, the live pointer, the batch journal's compacted copy, kept record images and
spooled records are all read by other processes while they are written (workers, replicas,
a job's next run); each copy of this code once fsynced differently.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def fsync_folder(folder: Path) -> None:
    """Make a rename in `folder` durable (POSIX: the directory entry is data too)."""
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_atomic(path: Path, data: str | bytes, durable: bool = True) -> None:
    """`path` becomes `data`: written to a temporary file beside it, renamed over it. A
    reader sees the old file or the new one, whole; `durable` (fsync of the file and the
    folder) makes that hold after a power cut too."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}.tmp")
    payload = data.encode("utf-8") if isinstance(data, str) else data
    with open(temporary, "wb") as handle:
        handle.write(payload)
        if durable:
            handle.flush()
            os.fsync(handle.fileno())
    os.replace(temporary, path)
    if durable:
        fsync_folder(path.parent)


@contextmanager
def exclusive(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive lock on `lock_path` (created if missing) for the block, waiting
    for other processes and replicas that share the folder."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def file_sha256(*paths: Path) -> str:
    """SHA-256 of the files' bytes, one after the other, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def share_file(source: Path, target: Path) -> None:
    """`target` becomes `source`'s bytes without copying them where the file system
    allows (a hard link; versions never modify their files), else a copy."""
    partial = target.with_name(".linking-" + target.name)
    try:
        os.link(source, partial)
    except OSError:
        shutil.copy2(source, partial)
    os.replace(partial, target)
