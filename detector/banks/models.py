"""Save the backbone and the memory bank as BentoML models, and load the pair back.

Two models rather than one: many banks (one per product or camera) share one backbone, and a
Bento packs exactly the pair its service names. The bank's labels name the backbone model it
was fitted with; `BackboneSpec.check_compatible` refuses any other pairing, here at export,
when the service starts, and when the batch job loads its models.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bentoml
from bentoml.exceptions import NotFound

from detector import runtimes
from detector.banks.location import model_store_dir
from detector.banks.products import (
    UnknownProductError,
    check_product,
    list_products,
    live_model,
    live_version,
    mark_served,
    version_model,
)
from detector.banks.versions import Draft, commit_version, load_bank
from detector.dino import load_pretrained
from detector.errors import UserError
from detector.extractor import BackboneSpec, FeatureExtractor, IncompatibleBankError
from detector.memory_bank import MemoryBank
from detector.quantized import product_extractor

BACKBONE_MODEL = "dino-backbone"
model_store_dir()  # before any bentoml.models call in this process: BentoML uses it too


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
    store, with its TorchScript trace (the torch runtime's fast start, detector.traced) and
    the ONNX graph the CPU runtimes run (detector.runtimes), both made from it here."""
    from detector.traced import TRACES_FOLDER, trace_backbone

    spec = backbone.spec
    labels = {
        "kind": "backbone",
        "source": _label(spec.source),
        "resolution": str(spec.resolution),
        "random_weights": str(backbone.random_weights).lower(),
        "graph": "onnx" if with_graph else "none",
    }
    with bentoml.models.create(
        name, labels=labels, metadata={**spec.to_dict(), "source": spec.source}
    ) as model:
        folder = Path(spec.source)
        if folder.is_dir():
            shutil.copytree(folder, model.path, dirs_exist_ok=True)
        else:  # a hub id: write the cached weights out as a plain folder
            load_pretrained(spec.source).save_pretrained(model.path)
        traced = trace_backbone(backbone, Path(model.path) / TRACES_FOLDER)
        # "refused": the trace was tried and did not reproduce the tokens on this machine.
        model.info.labels["trace"] = "torchscript" if traced else "refused"
        if with_graph:
            runtimes.export_graph(backbone, Path(model.path) / runtimes.GRAPHS_FOLDER)
            model.info.labels["graph_format"] = str(runtimes.EXPORT_FORMAT)
    return model


def find_backbone(
    spec: BackboneSpec, name: str = BACKBONE_MODEL, with_graph: bool = True
) -> bentoml.Model | None:
    """A stored backbone of exactly these weights (and a graph, if one is wanted), newest
    first: exporting a second product reuses it instead of storing the weights again."""
    if spec.fingerprint is None:
        return None
    try:
        candidates = bentoml.models.list(name)
    except (NotFound, bentoml.exceptions.BentoMLException):
        return None
    graph_labels = {"graph": "onnx", "graph_format": str(runtimes.EXPORT_FORMAT)}
    for model in sorted(candidates, key=lambda m: m.info.creation_time, reverse=True):
        labels = model.info.labels
        if with_graph and any(labels.get(k) != v for k, v in graph_labels.items()):
            continue  # no graph, or an older export's (detector.rope): store a new one
        if "trace" not in labels:  # stored before traces: store the weights once more
            continue
        stored_spec = BackboneSpec.from_dict(model.info.metadata)
        if (
            stored_spec.fingerprint == spec.fingerprint
            and stored_spec.feature_dim == spec.feature_dim
        ):
            return model
    return None


def save_bank(
    bank_dir: str | Path,
    backbone_model: bentoml.Model,
    metrics: dict[str, Any] | None = None,
    product: str | None = None,
    force: bool = False,
) -> bentoml.Model:
    """A fitted detector folder (index + bank.json) as a new version of its product's bank.

    The product is `product`, else the one `fit` recorded (`product=`), else the category.
    Without `force`, a fit never silently replaces a live bank that later changes made
    (added images, a reviewed threshold, a rollback), nor joins a store whose other products
    another backbone serves (one forward pass serves them all): `replaces` says why.
    """

    bank = MemoryBank.load(bank_dir)
    spec = BackboneSpec.from_dict(bank.metadata["extractor"])
    spec.check_compatible(BackboneSpec.from_dict(backbone_model.info.metadata))
    product = check_product(
        product or bank.metadata.get("product") or _label(bank.metadata.get("category", "default"))
    )
    if not force:
        check_export(product, spec)
    labels = {
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
    change = {
        "action": "fit",
        "source": str(Path(bank_dir).resolve()),
        "train_images": bank.metadata.get("n_train_images"),
        "mlflow_run_id": bank.metadata.get("mlflow_run_id"),
    }
    return commit_version(
        product,
        lambda parent: Draft(Path(bank_dir), change),
        backbone_model=str(backbone_model.tag),
        labels=labels,
        metrics=metrics or {},
    )


def check_export(product: str, spec: BackboneSpec) -> None:
    """Refuse the two exports that silently broke what was served (see `save_bank`)."""
    live = live_version(product)
    if live is not None:
        current = version_model(product, live).info.metadata
        action = current.get("change", {}).get("action", "change")
        if action != "fit":
            raise UserError(
                f"{product}'s live bank {live} was made by {action!r} after its fit "
                f"({current.get('bank_size')} rows, threshold {current.get('threshold')}): "
                "exporting this fit would replace it. Pass --force to make the new version "
                f"anyway (`python -m detector rollback {product} {live}` undoes it), or "
                "--product to export it as another product."
            )
    for other in list_products():
        if other == product or live_version(other) is None:
            continue
        served = live_model(other).info.metadata.get("extractor", {})
        try:
            BackboneSpec.from_dict(served).check_compatible(spec)
        except IncompatibleBankError:
            raise UserError(
                f"This bank was fitted with backbone {spec.source!r} (layers {spec.layers}, "
                f"{spec.resolution} px), but {other!r} in this store uses another: one "
                "service serves every product of a store with one backbone, so it would "
                f"refuse {product!r}. Refit with {other!r}'s backbone, export to another "
                "model store (BENTOML_HOME or INSPECT_MODEL_STORE), or pass --force and "
                "serve the products apart (INSPECT_PRODUCTS)."
            ) from None


def stored(tag: str | bentoml.Tag) -> bentoml.Model:
    """The stored model, or one sentence saying how to get it there."""
    try:
        return bentoml.models.get(tag)
    except (NotFound, bentoml.exceptions.BentoMLException):
        raise ModelMissingError(
            f"Model '{tag}' is not in the model store ({model_store_dir()}): run "
            "`python -m detector export "
            "<model_dir>` (after `python -m detector fit`), or name a tag that "
            "`bentoml models list` shows."
        ) from None


def checked_spec(
    backbone: bentoml.Model, banks: dict[str, bentoml.Model], runtime: str, precision: str
) -> BackboneSpec:
    """The one spec every bank was fitted with, checked against the backbone, the runtime
    and its stored graph: one forward pass serves every product, so banks of other layers
    or resolution cannot share it."""
    runtimes.check_runtime(runtime, precision)
    served, refused = split_by_backbone(backbone, banks)
    if refused:
        raise IncompatibleBankError(next(iter(refused.values())))
    first = BackboneSpec.from_dict(next(iter(served.values())).info.metadata["extractor"])
    if runtime != "torch":
        graph = runtimes.locate_graph(backbone.path, first.layers, first.resolution, False)
        first.check_compatible(BackboneSpec.from_dict(runtimes.graph_stamp(graph)["spec"]))
    return first


def split_by_backbone(
    backbone: bentoml.Model, banks: dict[str, bentoml.Model]
) -> tuple[dict[str, bentoml.Model], dict[str, str]]:
    """(the banks this backbone serves, {product: why not} for the others). One forward
    pass serves every product: the banks must match the backbone's weights and the first
    served bank's layers and resolution."""
    served: dict[str, bentoml.Model] = {}
    refused: dict[str, str] = {}
    weights = BackboneSpec.from_dict(backbone.info.metadata)
    setting: tuple[tuple[int, ...], int] | None = None
    for name, bank in banks.items():
        spec = BackboneSpec.from_dict(bank.info.metadata["extractor"])
        try:
            spec.check_compatible(weights)
        except IncompatibleBankError as error:
            refused[name] = f"{name}: {error}"
            continue
        if setting is not None and (tuple(spec.layers), spec.resolution) != setting:
            refused[name] = (
                f"{name} was fitted with layers {list(spec.layers)} at {spec.resolution} px, "
                f"the other products with {list(setting[0])} at {setting[1]} px; one server "
                "needs one backbone setting: serve it separately (INSPECT_PRODUCTS) or refit it."
            )
            continue
        setting = (tuple(spec.layers), spec.resolution)
        served[name] = bank
    return served, refused


def no_banks() -> ModelMissingError:
    return ModelMissingError(
        f"No product banks in the model store ({model_store_dir()}): run "
        "`python -m detector export "
        "<model_dir>` after `python -m detector fit`."
    )


def load_extractor(
    backbone: bentoml.Model,
    banks: dict[str, bentoml.Model],
    runtime: str = "torch",
    precision: str = "f32",
    **options: Any,
) -> FeatureExtractor:
    """The one way from the store to an extractor: the stored backbone, checked against
    every bank it will serve (`checked_spec`), run by `runtime`. A graph runtime uses the
    graph stored with the backbone (`export` writes it); nothing traces or compiles one from
    scratch here. `options`: device, half_precision, num_threads."""
    from detector.backbone import extractor_for

    spec = checked_spec(backbone, banks, runtime, precision)
    if runtime != "torch":
        options["export_missing"] = False
    options["stored_trace"] = True
    return extractor_for(spec, backbone.path, runtime=runtime, precision=precision, **options)


@dataclass
class LoadedPair:
    detector: Any  # AnomalyDetector; typed loosely so importing this module stays light
    tags: ModelTags
    product: str = ""  # the store's name for it (bank.json may not carry one)


def load_pair(
    bank_tag: str | None = None,
    backbone_tag: str | None = None,
    *,
    product: str | None = None,
    runtime: str = "torch",
    precision: str = "f32",
    device: str = "auto",
    half_precision: bool = False,
    num_threads: int | None = None,
    batch_size: int = 8,
) -> LoadedPair:
    """One product's detector from the store, for the batch job: the bank `bank_tag`, else
    the live version of `product`, else of the only product in the store."""
    from detector.anomaly_detector import AnomalyDetector

    if bank_tag:
        bank = stored(bank_tag)
    else:
        if product is None:
            known = list_products()
            if len(known) != 1:
                raise no_banks() if not known else UnknownProductError(None, known, "--product")
            product = known[0]
        bank = live_model(product)
    backbone = stored(backbone_tag or bank.info.metadata.get("backbone_model") or BACKBONE_MODEL)
    extractor = load_extractor(
        backbone,
        {str(bank.tag): bank},
        runtime,
        precision,
        device=device,
        half_precision=half_precision,
        num_threads=num_threads,
    )
    memory_bank = load_bank(bank)
    # An int8 product is scored by its own graph where the service would serve it so.
    extractor, _ = product_extractor(
        Path(bank.path),
        memory_bank.metadata,
        memory_bank.size,
        extractor,
        num_threads,
        str(bank.tag),
    )
    detector = AnomalyDetector.from_bank(memory_bank, extractor, batch_size)
    product_name = bank.info.metadata.get("product")
    if product_name:  # the job's results may be recorded: keep the version
        mark_served(str(product_name), str(bank.tag.version))
    return LoadedPair(
        detector, ModelTags(str(backbone.tag), str(bank.tag)), str(product_name or "")
    )
