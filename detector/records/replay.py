"""Replay: score recorded images again with the exact model versions their records name, and
report every decision that comes out differently.

An audit asks "would the same models decide the same today?". Each record names its
backbone and bank version and a hash of the scoring settings; each version is loaded once by
`load_detector` (the replay command loads them from the BentoML model store), its records'
kept images are decoded and scored as the service does (`AnomalyDetector.predict_prepared`),
and score and verdict are compared.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np

from detector.errors import UserError
from detector.images import InvalidImageError, decode_image
from detector.records.images import ImageStore
from detector.records.store import RecordStore

log = logging.getLogger(__name__)


@dataclass
class ReplayReport:
    checked: int = 0
    same: int = 0
    differing: list[dict[str, Any]] = field(default_factory=list)
    image_gone: int = 0  # never kept, or removed by retention
    models_gone: dict[str, str] = field(default_factory=dict)  # version -> why not loadable
    records_without_models: int = 0
    other_settings: int = 0  # scored with settings whose hash differs from the record's
    largest_score_change: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "checked": self.checked,
            "same": self.same,
            "differing": len(self.differing),
            "differences": self.differing[:1000],
            "image_gone": self.image_gone,
            "models_gone": self.models_gone,
            "records_without_models": self.records_without_models,
            "other_settings": self.other_settings,
            "largest_score_change": self.largest_score_change,
        }


# (bank tag, backbone tag) -> the detector they make; raises UserError when they are gone.
DetectorLoader = Callable[[str, str], Any]


def replay(
    records: RecordStore,
    images: ImageStore,
    load_detector: DetectorLoader,
    *,
    since: datetime | None = None,
    product: str | None = None,
    settings: dict[str, str] | None = None,
    batch_size: int = 8,
    tolerance: float = 1e-5,
    heatmap_max_side: int = 2048,
) -> ReplayReport:
    """Rescore every matching record whose image is kept; `tolerance` bounds |score change|,
    `settings` is the context of `AnomalyDetector.settings_hash` (runtime, precision)."""
    report = ReplayReport()
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for record in records.iterate(since=since, product=product):
        if not images.available(record["image_sha256"]):
            report.image_gone += 1
            continue
        groups[(record["backbone_model"], record["bank_model"])].append(record)
    for (backbone_tag, bank_tag), members in groups.items():
        try:
            detector = load_detector(bank_tag, backbone_tag)
        except UserError as error:
            report.models_gone[bank_tag] = str(error)
            report.records_without_models += len(members)
            log.warning("cannot replay %s: %s", bank_tag, error)
            continue
        expected = detector.settings_hash(**(settings or {}))
        for start in range(0, len(members), batch_size):
            chunk = members[start : start + batch_size]
            _compare(detector, chunk, images, expected, tolerance, heatmap_max_side, report)
    return report


def _compare(
    detector: Any,
    chunk: Iterable[dict[str, Any]],
    images: ImageStore,
    settings: str,
    tolerance: float,
    heatmap_max_side: int,
    report: ReplayReport,
) -> None:
    decoded, kept = [], []
    for record in chunk:
        data = images.get(record["image_sha256"])
        if data is None:  # removed since the listing
            report.image_gone += 1
            continue
        try:
            image = decode_image(data, max_bytes=len(data), max_pixels=2**31)
        except InvalidImageError as error:
            report.differing.append({"id": record["id"], "error": error.message})
            continue
        decoded.append(image)
        kept.append(record)
    if not decoded:
        return
    prepared = np.stack([detector.extractor.prepare(image) for image in decoded])
    sizes = [image.size for image in decoded]
    results = detector.predict_prepared(prepared, sizes, False, heatmap_max_side)
    for record, result in zip(kept, results, strict=True):
        report.checked += 1
        change = abs(float(result.score) - float(record["score"]))
        report.largest_score_change = max(report.largest_score_change, change)
        if record["settings_hash"] != settings:
            report.other_settings += 1
        if change <= tolerance and bool(result.is_anomalous) == bool(record["is_anomalous"]):
            report.same += 1
            continue
        report.differing.append(
            {
                "id": record["id"],
                "product": record["product"],
                "bank_model": record["bank_model"],
                "recorded_score": record["score"],
                "replayed_score": float(result.score),
                "recorded_verdict": record["verdict"],
                "replayed_verdict": "anomalous" if result.is_anomalous else "normal",
                "settings_changed": record["settings_hash"] != settings,
            }
        )
