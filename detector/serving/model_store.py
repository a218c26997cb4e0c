"""Save the backbone and the memory bank as BentoML models, and load the pair back.

Two models rather than one: many banks (one per product or camera) share one backbone, and a
Bento packs exactly the pair its service names. The bank's labels name the backbone model it
was fitted with; `BackboneSpec.check_compatible` refuses any other pairing, here at export,
when the service starts, and when the batch job loads its models.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bentoml
from bentoml.exceptions import NotFound

from detector.backbone import BackboneSpec, FeatureExtractor, load_pretrained
from detector.errors import UserError
from detector.memory_bank import INDEX_FILE, METADATA_FILE, MemoryBank

BACKBONE_MODEL = "dino-backbone"
BANK_MODEL = "inspection-bank"


class ModelMissingError(UserError):
    """A model named by the service or the batch job is not in the BentoML model store."""


@dataclass(frozen=True)
class ModelTags:
    """Which stored models made a result; every answer and journal row carries them."""

    backbone: str
    bank: str


def _label(value: Any) -> str:
    """BentoML labels are short strings; keep hub ids and paths readable but valid."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(value)).strip("_")[:63] or "none"


def save_backbone(backbone: FeatureExtractor, name: str = BACKBONE_MODEL) -> bentoml.Model:
    """Copy a loaded checkpoint's folder (or a hub download of it) into the model store."""
    spec = backbone.spec
    with bentoml.models.create(
        name,
        labels={
            "kind": "backbone",
            "source": _label(spec.source),
            "resolution": str(spec.resolution),
            "random_weights": str(backbone.random_weights).lower(),
        },
        metadata={**spec.to_dict(), "source": spec.source},
    ) as model:
        folder = Path(spec.source)
        if folder.is_dir():
            shutil.copytree(folder, model.path, dirs_exist_ok=True)
        else:  # a hub id: write the cached weights out as a plain folder
            load_pretrained(spec.source).save_pretrained(model.path)
    return model


def save_bank(
    bank_dir: str | Path,
    backbone_model: bentoml.Model,
    metrics: dict[str, Any] | None = None,
    name: str = BANK_MODEL,
) -> bentoml.Model:
    """Copy a fitted detector folder (index + bank.json) into the model store."""
    bank = MemoryBank.load(bank_dir)
    spec = BackboneSpec.from_dict(bank.metadata["extractor"])
    spec.check_compatible(BackboneSpec.from_dict(backbone_model.info.metadata))
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
        "extractor": spec.to_dict(),
        "backbone_model": str(backbone_model.tag),
        "bank_size": bank.size,
        "threshold": bank.metadata.get("calibration", {}).get("threshold"),
        "metrics": metrics or {},
    }
    with bentoml.models.create(name, labels=labels, metadata=metadata) as model:
        for filename in (INDEX_FILE, METADATA_FILE):
            shutil.copy2(Path(bank_dir) / filename, Path(model.path) / filename)
    return model


def stored(tag: str | bentoml.Tag) -> bentoml.Model:
    """The stored model, or one sentence saying how to get it there."""
    try:
        return bentoml.models.get(tag)
    except (NotFound, bentoml.exceptions.BentoMLException):
        raise ModelMissingError(
            f"Model '{tag}' is not in the BentoML model store (BENTOML_HOME="
            f"{os.environ.get('BENTOML_HOME', '~/bentoml')}): run `python -m detector export "
            "<model_dir>` (after `python -m detector fit`), or name a tag that "
            "`bentoml models list` shows."
        ) from None


def resolve_pair(
    bank_tag: str | None = None, backbone_tag: str | None = None
) -> tuple[bentoml.Model, bentoml.Model]:
    """(backbone, bank) from the store: the bank's own backbone unless one is named.

    Reads only metadata, so the service can refuse a missing or mismatched pair when it is
    imported, before any worker loads weights.
    """
    bank = stored(bank_tag or f"{BANK_MODEL}:latest")
    backbone = stored(backbone_tag or bank.info.metadata.get("backbone_model") or BACKBONE_MODEL)
    bank_spec = BackboneSpec.from_dict(bank.info.metadata["extractor"])
    bank_spec.check_compatible(BackboneSpec.from_dict(backbone.info.metadata))
    return backbone, bank


@dataclass
class LoadedPair:
    detector: Any  # AnomalyDetector; typed loosely so importing this module stays light
    tags: ModelTags


def load_pair(
    bank_tag: str | None = None,
    backbone_tag: str | None = None,
    *,
    device: str = "auto",
    half_precision: bool = False,
    num_threads: int | None = None,
    batch_size: int = 8,
) -> LoadedPair:
    """The detector the service's runner and the batch job score with, from the store."""
    from detector.anomaly_detector import AnomalyDetector

    backbone, bank = resolve_pair(bank_tag, backbone_tag)
    detector = AnomalyDetector.from_bank(
        MemoryBank.load(bank.path),
        batch_size=batch_size,
        source=backbone.path,
        device=device,
        half_precision=half_precision,
        num_threads=num_threads,
    )
    return LoadedPair(detector, ModelTags(str(backbone.tag), str(bank.tag)))
