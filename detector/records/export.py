"""Reviewed images in the MVTec AD layout, so the line's own reviews become a test set.

    OUT/<product>/train/good/         false alarms: defect-free parts the bank did not cover
    OUT/<product>/test/good/          the same false alarms, as the negatives of a test
    OUT/<product>/test/confirmed_defect/
    OUT/<product>/reviews.csv         record id, file, label, score, threshold, bank version

`python -m detector evaluate data.root=OUT data.category=<product> model_dir=...` then
measures the served model on the line's reviewed parts. A model refitted on train/good has
seen test/good: evaluate the model that made the decisions, not a refit. Records reviewed
`unsure`, and records whose image is no longer kept, are left out (and counted).
"""

from __future__ import annotations

import csv
import io
from collections import Counter
from pathlib import Path
from typing import Any

from PIL import Image

from detector.records.images import ImageStore
from detector.records.store import RecordStore

EXTENSIONS = {"PNG": ".png", "JPEG": ".jpg", "BMP": ".bmp", "TIFF": ".tiff", "WEBP": ".webp"}
FOLDERS = {
    "false_alarm": ("train/good", "test/good"),
    "confirmed_defect": ("test/confirmed_defect",),
}


def extension(data: bytes) -> str:
    with Image.open(io.BytesIO(data)) as image:
        return EXTENSIONS.get(image.format or "", ".png")


def export_reviews(
    records: RecordStore, images: ImageStore, out: Path, product: str | None = None
) -> dict[str, Any]:
    """Write every reviewed, kept image of `product` (or of all products) under `out`."""
    counts: Counter[str] = Counter()
    manifests: dict[str, list[dict[str, Any]]] = {}
    for record in records.iterate(product=product, reviewed_only=True):
        folders = FOLDERS.get(record["review_label"])
        if folders is None:
            counts["unsure"] += 1
            continue
        data = images.get(record["image_sha256"])
        if data is None:
            counts["image_gone"] += 1
            continue
        name = f"{record['id']}{extension(data)}"
        for folder in folders:
            target = out / record["product"] / folder / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        counts[record["review_label"]] += 1
        manifests.setdefault(record["product"], []).append(
            {
                "record_id": record["id"],
                "file": name,
                "label": record["review_label"],
                "score": record["score"],
                "threshold": record["threshold"],
                "bank_model": record["bank_model"],
                "reviewed_by": record["reviewed_by"],
                "reviewed_at": record["reviewed_at"],
            }
        )
    for name, rows in manifests.items():
        with (out / name / "reviews.csv").open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return {"out": str(out), "products": sorted(manifests), **counts}
