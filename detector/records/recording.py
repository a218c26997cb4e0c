"""A records folder opened for writing, the one way the service and the batch job do it:
the folder made private, the database migrated (or checked), kept images under their
limits, and a writer that spools while the database is down."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from detector.images import DEFAULT_MAX_PIXELS
from detector.records.images import ImageStore
from detector.records.store import RecordStore, migrate_database
from detector.records.writer import RecordWriter

log = logging.getLogger("inspection.records")
# The folders that hold images or records waiting for the database.
PRIVATE_INNER = ("images", "spool", "spool-batch")


def private_folder(folder: Path) -> None:
    """Make `folder` readable by this user only: records and kept images are for reviewers,
    not for other users of this machine. A mounted volume (a Kubernetes emptyDir or PVC)
    belongs to root and cannot be changed by the service's user: then the folders that hold
    images (kept, spooled) are made private instead, and the mount keeps its mode."""
    folder.mkdir(parents=True, exist_ok=True)
    try:
        folder.chmod(0o700)
    except PermissionError:
        for inner in PRIVATE_INNER:
            (folder / inner).mkdir(exist_ok=True)
            (folder / inner).chmod(0o700)
        log.info(
            "records folder %s is a volume this user cannot restrict: its images and "
            "spool folders are private instead",
            folder,
        )


@dataclass
class Recording:
    store: RecordStore
    images: ImageStore
    writer: RecordWriter

    def close(self, timeout: float | None = None) -> None:
        """Write what is queued (or spool it), then let the database go."""
        if timeout is None:
            self.writer.close()
        else:
            self.writer.close(timeout=timeout)
        self.store.close()


def open_recording(
    folder: Path,
    url: str,
    keep_images: str,
    *,
    spool: str = "spool",
    migrate: bool = True,
    images_max_age_days: float = 30,
    images_max_mb: float = 2048,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    spool_max_bytes: int = 256 << 20,
    on_count: Callable[[str, int], None] | None = None,
) -> Recording:
    """`migrate`: bring an older schema up to date now and whenever the database comes back
    (else only check it, and refuse to write to a stale one). `spool`: this writer's own
    spool folder (a batch job's records wait in theirs, the service's in its)."""
    private_folder(folder)
    store = RecordStore(url)
    if migrate:
        migrate_database(store, folder)
    images = ImageStore(
        folder / "images", keep_images, images_max_age_days, images_max_mb, max_pixels
    )
    writer = RecordWriter(
        store,
        folder / spool,
        images,
        prepare=store.migrate if migrate else store.check,
        spool_max_bytes=spool_max_bytes,
        on_count=on_count,
    )
    return Recording(store, images, writer)
