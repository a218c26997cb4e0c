"""Save the backbone and the memory bank as BentoML models, and build a detector from them.

Two models rather than one: many banks (one per product or camera) share one backbone, and a
Bento packs exactly the pair its service names. The bank's labels name the backbone model it
was fitted with; the fingerprint check in `AnomalyDetector` refuses any other pairing.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import bentoml

from detector.backbone import DinoBackbone, load_pretrained
from detector.memory_bank import INDEX_FILE, METADATA_FILE, MemoryBank
from detector.predictor import AnomalyDetector, check_compatible

BACKBONE_MODEL = "dino-backbone"
BANK_MODEL = "inspection-bank"


def _label(value: Any) -> str:
    """BentoML labels are short strings; keep hub ids and paths readable but valid."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(value)).strip("_")[:63] or "none"


def save_backbone(backbone: DinoBackbone, name: str = BACKBONE_MODEL) -> bentoml.Model:
    """Copy a loaded checkpoint's folder (or a hub download of it) into the model store."""
    with bentoml.models.create(
        name,
        labels={
            "kind": "backbone",
            "source": _label(backbone.name),
            "resolution": str(backbone.resolution),
            "random_weights": str(backbone.random_weights).lower(),
        },
        metadata={**backbone.spec, "source": backbone.name},
    ) as model:
        folder = Path(backbone.name)
        if folder.is_dir():
            shutil.copytree(folder, model.path, dirs_exist_ok=True)
        else:  # a hub id: write the cached weights out as a plain folder
            load_pretrained(backbone.name).save_pretrained(model.path)
    return model


def save_bank(
    bank_dir: str | Path,
    backbone_model: bentoml.Model,
    metrics: dict[str, Any] | None = None,
    name: str = BANK_MODEL,
) -> bentoml.Model:
    """Copy a fitted detector folder (index + bank.json) into the model store."""
    bank = MemoryBank.load(bank_dir)
    spec = bank.metadata.get("extractor", {})
    check_compatible(spec, backbone_model.info.metadata)
    labels = {
        "kind": "memory-bank",
        "category": _label(bank.metadata.get("category", "unknown")),
        "backbone_model": _label(backbone_model.tag),
    }
    if metrics:
        labels.update(
            {
                key: f"{metrics[key]:.4f}"
                for key in ("image_auroc", "pixel_auroc", "aupro")
                if isinstance(metrics.get(key), float)
            }
        )
    metadata = {
        "extractor": spec,
        "backbone_model": str(backbone_model.tag),
        "bank_size": bank.size,
        "threshold": bank.metadata.get("calibration", {}).get("threshold"),
        "metrics": metrics or {},
    }
    with bentoml.models.create(name, labels=labels, metadata=metadata) as model:
        for filename in (INDEX_FILE, METADATA_FILE):
            shutil.copy2(Path(bank_dir) / filename, Path(model.path) / filename)
    return model


def load_detector(
    backbone_path: str | Path,
    bank_path: str | Path,
    *,
    device: str = "auto",
    half_precision: bool = False,
    num_threads: int | None = None,
    batch_size: int = 8,
) -> AnomalyDetector:
    """Build the detector the service and batch job use; refuses a mismatched pair."""
    bank = MemoryBank.load(bank_path)
    spec = bank.metadata.get("extractor", {})
    backbone = DinoBackbone(
        str(backbone_path),
        layers=spec.get("layers", [-1]),
        resolution=int(spec.get("resolution", 448)),
        device=device,
        half_precision=half_precision,
        num_threads=num_threads,
    )
    return AnomalyDetector.from_bank(bank, extractor=backbone, batch_size=batch_size)
