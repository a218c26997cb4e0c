"""`python -m batch --record`: each row scored in this process also becomes an inspection
record, in the same database (and image folder) the service records to, so the review queue,
replay and export-reviews cover batch decisions too. Runs with --url record nothing here:
the service records what it scores.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from batch.loader import LoadedImage
from detector.records.images import ImageStore
from detector.records.model import make_record
from detector.records.store import RecordStore, locate_records, migrate_database
from detector.records.writer import RecordWriter


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
        self.store = RecordStore(url)
        migrate_database(self.store, folder)
        self.images = ImageStore(folder / "images", keep_images)
        # Its own spool: a job that ends while the database is down leaves its records
        # there, and the next --record run on this machine writes them.
        self.writer = RecordWriter(
            self.store, folder / "spool-batch", self.images, prepare=self.store.migrate
        )
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
        self.writer.close(timeout=120)
        self.store.close()
        return dict(self.counts)
