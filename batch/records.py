"""`python -m batch --record`: each row scored in this process also becomes an inspection
record, in the same database (and image folder) the service records to, so the review queue,
replay and export-reviews cover batch decisions too. Runs with --url record nothing here:
the service records what it scores.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from batch.loader import LoadedImage
from detector.records.model import make_record
from detector.records.recording import open_recording
from detector.records.store import locate_records


class BatchRecorder:
    def __init__(
        self,
        input_dir: Path,
        records_dir: str | None,
        db: str | None,
        keep_images: str,
        product: str,
        settings_hash: str,
    ) -> None:
        folder, url = locate_records(records_dir, db)
        self.root = input_dir
        self.product, self.settings_hash = product, settings_hash
        # Its own spool: a job that ends while the database is down leaves its records
        # there, and the next --record run on this machine writes them.
        self.recording = open_recording(folder, url, keep_images, spool="spool-batch")
        self.images, self.writer = self.recording.images, self.recording.writer
        self.counts = self.writer.counts

    def __call__(self, item: LoadedImage, row: dict[str, Any]) -> None:
        data = (self.root / item.relative_path).read_bytes()
        record = make_record(
            product=self.product,
            image=data,
            result=row,
            backbone_model=row["backbone_model"],
            bank_model=row["bank_model"],
            settings_hash=self.settings_hash,
            source="batch",
            name=item.relative_path,
        )
        self.writer.submit(record, data if self.images.wants(row["is_anomalous"]) else None)

    def close(self) -> dict[str, int]:
        self.recording.close(timeout=120)
        return dict(self.counts)
