"""A product's bank versions: each change (a fit, added images, a recalibration, a new
operating point, a rollback) is a new version whose metadata says what changed, from which
parent, why and when, so `bentoml models list` shows every version and `bentoml models
export` carries one with its history.

- Rollback makes a new version with an earlier version's files rather than moving a
  pointer: history stays a straight line.
- Each version's metadata holds the SHA-256 of its files, checked when it is loaded: a
  truncated or replaced file is refused with a sentence, never scored with.
- A version that only moves the threshold shares its parent's index file (a hard link).

`detector.banks.products` holds the names, the live pointer and the lock."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import bentoml

from detector.banks.authors import author
from detector.banks.products import (
    LIVE_FILE,
    BankCorrupt,
    LiveVersionMissing,
    UnknownProductError,
    list_products,
    live_model,
    live_version,
    mark_served,
    model_name,
    next_number,
    product_dir,
    product_lock,
    prune_versions,
    version_model,
    version_numbers,
    write_live,
)
from detector.errors import UserError
from detector.files import file_sha256, share_file
from detector.int8_check import INT8_FOLDER, INT8_KEY
from detector.int8_check import status as int8_status
from detector.memory_bank import INDEX_FILE, METADATA_FILE, MemoryBank
from detector.provenance import CROPS_FILE, PROVENANCE_FILE
from detector.scoring import Calibration


def _storable(value: Any) -> Any:
    """BentoML metadata holds no None: absent keys say "none" instead."""
    if isinstance(value, dict):
        return {key: _storable(item) for key, item in value.items() if item is not None}
    if isinstance(value, list | tuple):
        return [_storable(item) for item in value]
    return value


@dataclass(frozen=True)
class Draft:
    """What a change's `make` returns: the new bank's files and its change record."""

    folder: Path  # holds bank.json, and index.faiss unless `index_of` is given
    change: dict[str, Any]
    index_of: bentoml.Model | None = None  # a stored version whose index this one shares


# The files that hold a version's rows, shared by the versions that keep its rows.
ROW_FILES = (INDEX_FILE, PROVENANCE_FILE, CROPS_FILE)


def _parent_or_missing(product: str) -> tuple[bentoml.Model | None, str | None]:
    """(the live version, None), or (None, the missing live version's tag)."""
    try:
        return (live_model(product) if live_version(product) else None), None
    except LiveVersionMissing:
        version = (product_dir(product) / LIVE_FILE).read_text().strip()
        return None, f"{model_name(product)}:{version}"


def commit_version(
    product: str,
    make: Callable[[bentoml.Model | None], Draft],
    *,
    backbone_model: str | None = None,
    labels: dict[str, str] | None = None,
    metrics: dict[str, Any] | None = None,
    allow_missing_parent: bool = False,
) -> bentoml.Model:
    """Make a new version from the live one, under the product's lock, and make it live.

    `make(parent)` builds the new bank's files from the live version (None for a product's
    first version) while no other writer can change that version. With the live version
    missing from the store only a change that needs no parent (a rollback, a fit) may run.
    """
    with product_lock(product):
        parent, missing = _parent_or_missing(product)
        if missing and not allow_missing_parent:
            live_version(product)  # raises LiveVersionMissing with its sentence
        draft = make(parent)  # a refused change uses up no number
        number = next_number(product)
        inherited = parent.info.metadata if parent is not None else {}
        metadata = {
            "product": product,
            "version": number,
            "change": {
                "time": datetime.now(UTC).isoformat(timespec="seconds"),
                "parent": str(parent.tag) if parent is not None else missing,
                **draft.change,
                "by": author(draft.change),
            },
            "backbone_model": backbone_model or inherited.get("backbone_model"),
            "metrics": metrics if metrics is not None else inherited.get("metrics", {}),
            **_describe_files(draft),
        }
        if metadata["backbone_model"] is None:
            raise UserError("a product's first bank version must name its backbone model")
        all_labels = {
            "kind": "memory-bank",
            "product": product,
            "version": str(number),
            "action": str(draft.change.get("action", "change")),
            **(labels or {}),
        }
        tag = f"{model_name(product)}:v{number}"
        rows = [name for name in ROW_FILES if name in metadata["files"]]
        shared = _shared_rows(draft, parent, inherited.get("files", {}), metadata["files"])
        with bentoml.models.create(tag, labels=all_labels, metadata=_storable(metadata)) as model:
            shutil.copy2(draft.folder / METADATA_FILE, Path(model.path) / METADATA_FILE)
            for name in (name for name in rows if name not in shared):
                shutil.copy2(draft.folder / name, Path(model.path) / name)
        version_dir = product_dir(product) / f"v{number}"
        for name, source in shared.items():
            share_file(Path(source.path) / name, version_dir / name)
        for name in (*rows, METADATA_FILE):  # versions never change their files
            (version_dir / name).chmod(0o444)
        _carry_int8(draft, parent, version_dir)
        write_live(product, f"v{number}")
        prune_versions(product)
    return bentoml.models.get(tag)


def _shared_rows(
    draft: Draft, parent: bentoml.Model | None, inherited: dict[str, str], files: dict[str, str]
) -> dict[str, bentoml.Model]:
    """The row files a new version takes from a stored one by a hard link: all of them when
    it keeps that version's rows, else those equal to its parent's (the fit's crops)."""
    if draft.index_of is not None:
        return {name: draft.index_of for name in ROW_FILES if name in files}
    same = [name for name in ROW_FILES if name in files and inherited.get(name) == files[name]]
    return {name: parent for name in same} if parent is not None else {}


def _carry_int8(draft: Draft, parent: bentoml.Model | None, version_dir: Path) -> None:
    """An int8 product's graph and check images (detector.quantized) go with each of its
    versions: a fit's own, else those of the version whose rows this one shares (a rollback
    restores its own graph with its own check), else the parent's; shared, not copied."""
    document = json.loads((draft.folder / METADATA_FILE).read_text())
    if not document.get(INT8_KEY):
        return
    sources = [draft.folder, *(Path(m.path) for m in (draft.index_of, parent) if m is not None)]
    source = next((s / INT8_FOLDER for s in sources if (s / INT8_FOLDER).is_dir()), None)
    if source is None:
        return  # the version says so: detector.quantized.status serves it in f32
    target = version_dir / INT8_FOLDER
    target.mkdir(exist_ok=True)
    for item in source.iterdir():
        share_file(item, target / item.name)
        (target / item.name).chmod(0o444)


def commit_document_change(
    product: str, edit: Callable[[bentoml.Model, dict[str, Any]], dict[str, Any]]
) -> bentoml.Model:
    """A new live version with the live one's rows (its index is shared, not copied) and its
    bank.json as `edit(parent, document)` leaves it; `edit` returns the change record. The
    operating point and the mask change this way."""

    def make(parent: bentoml.Model | None) -> Draft:
        if parent is None:
            raise UnknownProductError(product, list_products())
        verify(parent)
        document = MemoryBank.read_document(parent.path)
        change = edit(parent, document)
        folder = MemoryBank.write_document(Path(scratch) / "bank", document)
        return Draft(folder, change, index_of=parent)

    with tempfile.TemporaryDirectory(prefix="bank-change-") as scratch:
        return commit_version(product, make)


def _row_hashes(draft: Draft) -> dict[str, str]:
    """The SHA-256 of the files that hold the rows (a shared file's is inherited)."""
    folder = Path(draft.index_of.path) if draft.index_of is not None else draft.folder
    known = draft.index_of.info.metadata.get("files", {}) if draft.index_of is not None else {}
    return {
        name: known.get(name) or file_sha256(folder / name)
        for name in ROW_FILES
        if (folder / name).exists()
    }


def _describe_files(draft: Draft) -> dict[str, Any]:
    """What a version's metadata says of its files: the extractor, rows, threshold and
    calibration from bank.json, and each file's SHA-256 (a shared index's is inherited)."""
    document = MemoryBank.read_document(draft.folder)
    if draft.index_of is not None:
        size = draft.index_of.info.metadata.get("bank_size")
    else:
        size = MemoryBank.load(draft.folder).size
    calibration = document.get("calibration", {})
    return {
        "extractor": document["extractor"],
        "bank_size": size,
        "threshold": calibration.get("threshold"),
        "calibration": calibration_summary(calibration),
        # The capture sessions' names where they are known (detector.sessions).
        "sessions": {
            "bank": document.get("bank_sessions") or [],
            "calibration": calibration.get("session_names") or [],
        },
        "tiling": document.get("tiling"),  # None: whole frames (detector.tiling)
        "int8": int8_status(document, size),  # None: served in f32, as asked
        "files": {**_row_hashes(draft), METADATA_FILE: file_sha256(draft.folder / METADATA_FILE)},
    }


def calibration_summary(calibration: dict[str, Any]) -> dict[str, Any]:
    """How a version's threshold was set and what its calibration scores can show
    (`Calibration.estimate`): the rule, the target, the scores' source and count, the
    expected false-alarm rate and its upper bound."""
    if not calibration.get("reference_scores"):
        return {}
    setting = Calibration.from_dict(calibration)
    return {"rule": setting.rule, "source": setting.source, **setting.estimate()}


def describe(model: bentoml.Model) -> dict[str, Any]:
    """One version as /products and /history show it."""
    metadata = model.info.metadata
    return {
        "version": str(model.tag.version),
        "tag": str(model.tag),
        "bank_rows": metadata.get("bank_size"),
        "threshold": metadata.get("threshold"),
        "calibration": metadata.get("calibration", {}),
        "sessions": metadata.get("sessions"),
        "tiling": metadata.get("tiling"),
        "int8": metadata.get("int8"),
        "backbone_model": metadata.get("backbone_model"),
        "created": model.info.creation_time.isoformat(timespec="seconds"),
        "change": metadata.get("change", {}),
    }


def history(
    product: str, limit: int | None = None, before: int | None = None
) -> list[dict[str, Any]]:
    """A product's versions, oldest first, with what changed and why: the newest `limit`
    of those numbered below `before` (all of them by default). Each version's metadata is
    read once."""
    numbers = version_numbers(product)
    if not numbers:
        raise UnknownProductError(product, list_products())
    try:
        live = live_version(product)
    except LiveVersionMissing:
        live = None
    chosen = [n for n in numbers if before is None or n < before]
    if limit is not None:
        chosen = chosen[-limit:]
    return [
        {**describe(bentoml.models.get(f"{model_name(product)}:v{n}")), "live": f"v{n}" == live}
        for n in chosen
    ]


def rollback(product: str, version: str | int, reason: str = "") -> bentoml.Model:
    """A new live version with an earlier version's exact files (and so its exact scores);
    the only change allowed while the live version is missing from the store."""
    target = version_model(product, version)

    def make(parent: bentoml.Model | None) -> Draft:
        verify(target)  # never restore a damaged version
        change = {"action": "rollback", "restored": str(target.tag.version), "reason": reason}
        mark_served(product, str(target.tag.version))  # retention keeps what was restored
        return Draft(Path(target.path), change, index_of=target)

    return commit_version(
        product,
        make,
        metrics=target.info.metadata.get("metrics", {}),
        backbone_model=target.info.metadata.get("backbone_model"),
        allow_missing_parent=True,
    )


def verify(model: bentoml.Model) -> None:
    """Refuse a version whose files are not the ones it was saved with (truncated, replaced,
    half-copied): `BankCorrupt`, with a sentence, instead of scores from a broken bank.
    Versions saved before file hashes were kept are loaded as they are."""
    expected = model.info.metadata.get("files") or {}
    for name, digest in expected.items():
        path = Path(model.path) / name
        try:
            actual = file_sha256(path)
        except OSError:
            actual = None
        if actual != digest:
            product = model.info.metadata.get("product", model.tag.name)
            raise BankCorrupt(
                f"{model.tag}'s {name} is missing or not the file it was saved with: roll "
                f"{product} back to another version, or restore the file."
            )


def load_bank(model: bentoml.Model) -> MemoryBank:
    """A stored version's bank, its files checked first."""
    verify(model)
    try:
        return MemoryBank.load(model.path)
    except (RuntimeError, ValueError, OSError, KeyError) as error:
        raise BankCorrupt(f"{model.tag} cannot be read ({type(error).__name__}).") from None


def scoring_versions(product: str) -> tuple[bentoml.Model, list[str]]:
    """The live version, and the tags of the versions whose scores equal its scores: it and
    the versions before it that only moved the operating point (same bank rows), back to
    the one that set the rows, or to the first one no longer in the store. Records of these
    are on the live version's scale."""
    from bentoml.exceptions import NotFound

    live = live_model(product)
    tags = [str(live.tag)]
    model = live
    while model.info.metadata.get("change", {}).get("action") == "operating_point":
        parent = model.info.metadata["change"].get("parent")
        if not parent:
            break
        try:
            model = bentoml.models.get(parent)
        except (NotFound, bentoml.exceptions.BentoMLException):
            break
        tags.append(str(model.tag))
    return live, tags
