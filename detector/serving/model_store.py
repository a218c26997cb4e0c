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


def save_backbone(
    backbone: FeatureExtractor, name: str = BACKBONE_MODEL, with_graph: bool = True
) -> bentoml.Model:
    """Copy a loaded torch checkpoint's folder (or a hub download of it) into the model
    store, with the ONNX graph the CPU runtimes run (detector.runtimes) exported from it."""
    spec = backbone.spec
    with bentoml.models.create(
        name,
        labels={
            "kind": "backbone",
            "source": _label(spec.source),
            "resolution": str(spec.resolution),
            "random_weights": str(backbone.random_weights).lower(),
            "graph": "onnx" if with_graph else "none",
        },
        metadata={**spec.to_dict(), "source": spec.source},
    ) as model:
        folder = Path(spec.source)
        if folder.is_dir():
            shutil.copytree(folder, model.path, dirs_exist_ok=True)
        else:  # a hub id: write the cached weights out as a plain folder
            load_pretrained(spec.source).save_pretrained(model.path)
        if with_graph:
            from detector.runtimes import GRAPHS_FOLDER, export_graph

            export_graph(backbone, Path(model.path) / GRAPHS_FOLDER)
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
    if bank.metadata.get("demo"):
        labels["demo"] = "true"  # a synthetic-set demo model, not for a real line
    if bank.metadata.get("mlflow_run_id"):
        labels["mlflow_run_id"] = str(bank.metadata["mlflow_run_id"])
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
    bank_tag: str | None = None,
    backbone_tag: str | None = None,
    runtime: str = "torch",
    precision: str = "f32",
) -> tuple[bentoml.Model, bentoml.Model]:
    """(backbone, bank) from the store: the bank's own backbone unless one is named.

    Reads metadata (and, for a graph runtime, the stored graph's stamp), never weights, so
    the service refuses a missing or mismatched pair, an uninstalled runtime or a graph of
    other weights when it is imported, before any worker starts.
    """
    from detector.runtimes import check_runtime, graph_stamp, locate_graph

    check_runtime(runtime, precision)
    bank = stored(bank_tag or f"{BANK_MODEL}:latest")
    backbone = stored(backbone_tag or bank.info.metadata.get("backbone_model") or BACKBONE_MODEL)
    bank_spec = BackboneSpec.from_dict(bank.info.metadata["extractor"])
    bank_spec.check_compatible(BackboneSpec.from_dict(backbone.info.metadata))
    if runtime != "torch":
        graph = locate_graph(backbone.path, bank_spec.layers, bank_spec.resolution, False)
        bank_spec.check_compatible(BackboneSpec.from_dict(graph_stamp(graph)["spec"]))
    return backbone, bank


@dataclass
class LoadedPair:
    detector: Any  # AnomalyDetector; typed loosely so importing this module stays light
    tags: ModelTags


def load_pair(
    bank_tag: str | None = None,
    backbone_tag: str | None = None,
    *,
    runtime: str = "torch",
    precision: str = "f32",
    device: str = "auto",
    half_precision: bool = False,
    num_threads: int | None = None,
    batch_size: int = 8,
) -> LoadedPair:
    """The detector the service's runner and the batch job score with, from the store.

    A graph runtime uses the graph stored with the backbone (`export` writes it); nothing is
    exported here, so serving never traces or compiles a graph from scratch.
    """
    from detector.anomaly_detector import AnomalyDetector

    backbone, bank = resolve_pair(bank_tag, backbone_tag, runtime, precision)
    options = {"export_missing": False} if runtime != "torch" else {}
    detector = AnomalyDetector.from_bank(
        MemoryBank.load(bank.path),
        batch_size=batch_size,
        source=backbone.path,
        runtime=runtime,
        precision=precision,
        device=device,
        half_precision=half_precision,
        num_threads=num_threads,
        **options,
    )
    return LoadedPair(detector, ModelTags(str(backbone.tag), str(bank.tag)))
