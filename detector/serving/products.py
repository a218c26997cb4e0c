"""Products and their bank versions in the BentoML model store: history, live version, rollback.

A product (`carpet`, `line3-grey`) is the BentoML model `bank-<product>`; each change to its
bank (a fit, added images, a recalibration, a rollback) is a new version `v1`, `v2`, ... whose
metadata says what changed, from which parent, why and when. So `bentoml models list` shows
every product and version, and `bentoml models export` carries a version with its history.

The live version is the newest one. Rollback makes a new version with an earlier version's
files rather than moving a pointer, so history stays a straight line and "live" never needs
anything but the store to be known. Writers take a per-product file lock (every worker and
every replica sharing the store), so two concurrent updates both land, one on top of the
other. After a version is complete, its number is written to `<store>/bank-<product>/live`
(atomically): readers poll that one small file, and never see a half-copied version.

Nothing switches or grows silently:
- version numbers come from a counter (`<store>/bank-<product>/counter`) and are never
  reused, so a record's `bank-x:v6` names one bank forever;
- each version's metadata holds the SHA-256 of its files, checked when it is loaded: a
  truncated or replaced file is refused with a sentence, never scored with;
- a live version that disappears makes its product answer 503 (`LiveVersionMissing`),
  never quietly fall back to an older bank;
- a version that only moves the threshold shares its parent's index file (a hard link),
  and old versions are removed beyond `INSPECT_KEEP_VERSIONS` (20) unless the live pointer
  or a rollback names them, or they scored something (`mark_served`), which records may
  name.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import bentoml
import numpy as np

from detector.errors import UserError
from detector.memory_bank import INDEX_FILE, METADATA_FILE, MemoryBank
from detector.scoring import Calibration
from detector.serving.store_location import model_store_dir

if TYPE_CHECKING:  # the backbone (torch) is imported by the runner only
    from detector.backbone import FeatureExtractor

log = logging.getLogger("inspection")
model_store_dir()  # before any bentoml.models call in this process: BentoML uses it too
BANK_PREFIX = "bank-"
LIVE_FILE = "live"
LOCK_FILE = ".update.lock"
COUNTER_FILE = "counter"
KEEP_FILE = "keep"  # versions retention keeps: they served, or a rollback restored them
PRODUCT_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,57}$")
VERSION_NAME = re.compile(r"^v([1-9][0-9]{0,8})$")
DEFAULT_KEEP_VERSIONS = 20


class UnknownProductError(UserError):
    """A product no bank exists for; HTTP 404 with the known names."""

    def __init__(
        self, name: str | None, known: list[str], how: str = "form field 'product'"
    ) -> None:
        listed = (
            ", ".join(known) or "none yet: export a fitted bank with `python -m detector export`"
        )
        if name is None:
            message = f"Name the product ({how}); known products: {listed}."
        else:
            message = f"Unknown product {name!r}; known products: {listed}."
        super().__init__(message)
        self.name, self.known = name, known


class VersionError(UserError):
    """A bank version that does not exist (HTTP 404)."""


class BankUnavailable(UserError):
    """A product whose live bank cannot be served as it is (HTTP 503, and an alert)."""

    status, reason = 503, "bank_unavailable"


class LiveVersionMissing(BankUnavailable):
    reason = "bank_missing"


class BankCorrupt(BankUnavailable):
    reason = "bank_corrupt"


class BankIncompatible(BankUnavailable):
    """Fitted with another backbone (or layers, resolution) than the one this server runs:
    its features would not be the bank's. The other products are served."""

    reason = "bank_incompatible"


def check_product(name: str) -> str:
    if not isinstance(name, str) or not PRODUCT_NAME.match(name):
        shown = (
            repr(name[:64]) + ("..." if len(name) > 64 else "") if isinstance(name, str) else "?"
        )
        raise UserError(
            f"Product name {shown} is not valid: use lowercase letters, digits, '-', '_' or "
            "'.', starting with a letter or digit, at most 58 characters."
        )
    return name


def model_name(product: str) -> str:
    return BANK_PREFIX + check_product(product)


def store_dir() -> Path:
    """The model store folder: a shared one, a Bento's packed models, or BENTOML_HOME's
    (detector/serving/store_location.py)."""
    return model_store_dir()


def _product_dir(product: str) -> Path:
    return store_dir() / model_name(product)


def _numbers(product: str) -> list[int]:
    """Version numbers whose model is complete (model.yaml is written last)."""
    folder = _product_dir(product)
    if not folder.is_dir():
        return []
    found = (VERSION_NAME.match(entry.name) for entry in folder.iterdir() if entry.is_dir())
    return sorted(
        int(match.group(1))
        for match in found
        if match and (folder / match.group(0) / "model.yaml").exists()
    )


def list_products() -> list[str]:
    """Every product with at least one complete bank version in the store."""
    root = store_dir()
    if not root.is_dir():
        return []
    names = (
        entry.name.removeprefix(BANK_PREFIX)
        for entry in root.iterdir()
        if entry.name.startswith(BANK_PREFIX)
    )
    return sorted(name for name in names if PRODUCT_NAME.match(name) and _numbers(name))


def live_version(product: str) -> str | None:
    """'vN' of the live version: the pointer file, or (before any pointer was written) the
    newest complete version. A pointer to a version that is gone raises
    `LiveVersionMissing`: serving another bank instead would change every verdict unseen."""
    folder = _product_dir(product)
    try:
        version = (folder / LIVE_FILE).read_text().strip()
    except OSError:
        numbers = _numbers(product)
        return f"v{numbers[-1]}" if numbers else None
    if VERSION_NAME.match(version) and (folder / version / "model.yaml").exists():
        return version
    raise LiveVersionMissing(
        f"{model_name(product)}:{version[:24]} is the live version but is missing from the "
        f"model store: roll {product} back to a version that exists (`python -m detector "
        f"rollback {product} vN`, or POST /products/{product}/rollback)."
    )


def live_model(product: str) -> bentoml.Model:
    version = live_version(product)
    if version is None:
        raise UnknownProductError(product, list_products())
    return bentoml.models.get(f"{model_name(product)}:{version}")


def version_model(product: str, version: str | int) -> bentoml.Model:
    text = str(version)
    version = f"v{text}" if text.isascii() and text.isdigit() else text
    match = VERSION_NAME.match(version)
    if not match or int(match.group(1)) not in _numbers(product):
        known = ", ".join(f"v{n}" for n in _numbers(product)) or "none"
        shown = version[:24] + ("..." if len(version) > 24 else "")
        raise VersionError(f"{product} has no bank version {shown!r}; versions: {known}.")
    return bentoml.models.get(f"{model_name(product)}:{version}")


@contextmanager
def product_lock(product: str) -> Iterator[None]:
    """One writer per product across processes and replicas that share the store."""
    folder = _product_dir(product)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / LOCK_FILE, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _write_live(product: str, version: str) -> None:
    _write_atomic(_product_dir(product) / LIVE_FILE, version + "\n")


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


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _next_number(product: str) -> int:
    """The next version number, never one used before (call under the product's lock)."""
    folder = _product_dir(product)
    try:
        counted = int((folder / COUNTER_FILE).read_text().strip())
    except (OSError, ValueError):
        counted = 0
    numbers = _numbers(product)
    number = max(counted, numbers[-1] if numbers else 0) + 1
    _write_atomic(folder / COUNTER_FILE, f"{number}\n")
    return number


def _write_atomic(path: Path, text: str) -> None:
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, prefix=".tmp-") as handle:
        handle.write(text)
    os.replace(handle.name, path)


def _share_file(source: Path, target: Path) -> None:
    """`target` becomes `source`'s bytes without copying them where the file system
    allows (a hard link; versions never modify their files), else a copy."""
    partial = target.with_name(".linking-" + target.name)
    try:
        os.link(source, partial)
    except OSError:
        shutil.copy2(source, partial)
    os.replace(partial, target)


def _parent_or_missing(product: str) -> tuple[bentoml.Model | None, str | None]:
    """(the live version, None), or (None, the missing live version's tag)."""
    try:
        return (live_model(product) if live_version(product) else None), None
    except LiveVersionMissing:
        version = (_product_dir(product) / LIVE_FILE).read_text().strip()
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
        number = _next_number(product)
        inherited = parent.info.metadata if parent is not None else {}
        metadata = {
            "product": product,
            "version": number,
            "change": {
                "time": datetime.now(UTC).isoformat(timespec="seconds"),
                "parent": str(parent.tag) if parent is not None else missing,
                **draft.change,
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
        with bentoml.models.create(tag, labels=all_labels, metadata=_storable(metadata)) as model:
            shutil.copy2(draft.folder / METADATA_FILE, Path(model.path) / METADATA_FILE)
            if draft.index_of is None:
                shutil.copy2(draft.folder / INDEX_FILE, Path(model.path) / INDEX_FILE)
        version_dir = _product_dir(product) / f"v{number}"
        if draft.index_of is not None:
            _share_file(Path(draft.index_of.path) / INDEX_FILE, version_dir / INDEX_FILE)
        for name in (INDEX_FILE, METADATA_FILE):  # versions never change their files
            (version_dir / name).chmod(0o444)
        _write_live(product, f"v{number}")
        prune_versions(product)
    return bentoml.models.get(tag)


def _describe_files(draft: Draft) -> dict[str, Any]:
    """What a version's metadata says of its files: the extractor, rows, threshold and
    calibration from bank.json, and each file's SHA-256 (a shared index's is inherited)."""
    document = MemoryBank.read_document(draft.folder)
    if draft.index_of is not None:
        size = draft.index_of.info.metadata.get("bank_size")
        index_hash = draft.index_of.info.metadata.get("files", {}).get(INDEX_FILE) or (
            file_sha256(Path(draft.index_of.path) / INDEX_FILE)
        )
    else:
        size = MemoryBank.load(draft.folder).size
        index_hash = file_sha256(draft.folder / INDEX_FILE)
    calibration = document.get("calibration", {})
    return {
        "extractor": document["extractor"],
        "bank_size": size,
        "threshold": calibration.get("threshold"),
        "calibration": calibration_summary(calibration),
        "files": {
            INDEX_FILE: index_hash,
            METADATA_FILE: file_sha256(draft.folder / METADATA_FILE),
        },
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
    numbers = _numbers(product)
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


def mark_served(product: str, version: str) -> None:
    """Note that a version scored something (and records may name it): retention keeps it.
    A version a rollback restored is kept the same way (a known good bank)."""
    folder = _product_dir(product)
    try:
        if version in (folder / KEEP_FILE).read_text().split():
            return
    except OSError:
        pass
    with open(folder / KEEP_FILE, "a") as handle:  # one short append: atomic enough
        handle.write(version + "\n")


def keep_versions() -> int:
    value = os.environ.get("INSPECT_KEEP_VERSIONS", "").strip()
    if not value:
        return DEFAULT_KEEP_VERSIONS
    if not (value.isascii() and value.isdigit()) or int(value) < 1:
        raise UserError(
            f"INSPECT_KEEP_VERSIONS must be a whole number of at least 1; it is {value!r}."
        )
    return int(value)


def _remove_version(path: Path) -> None:
    """Delete an old version's folder: renamed away first, so no reader ever sees half of
    it. (`bentoml.models.delete` reads every version of the model to do the same: 0.5 s a
    version at 400 versions.) Never the newest version, so BentoML's `latest` stays true."""
    gone = path.with_name(f".removing-{path.name}-{os.getpid()}")
    os.replace(path, gone)
    shutil.rmtree(gone, ignore_errors=True)


def prune_versions(product: str, keep: int | None = None) -> list[str]:
    """Remove versions beyond the newest `keep`, except the live one and those `mark_served`
    kept (they scored, so records may name them, or a rollback restored them). Call under
    the product's lock."""
    keep = keep_versions() if keep is None else keep
    numbers = _numbers(product)
    if len(numbers) <= keep:
        return []
    folder = _product_dir(product)
    try:
        protected = set((folder / KEEP_FILE).read_text().split())
    except OSError:
        protected = set()
    with suppress(LiveVersionMissing):
        protected.add(live_version(product) or "")
    removed = []
    for number in numbers[:-keep]:
        version = f"v{number}"
        if version not in protected:
            _remove_version(folder / version)
            removed.append(version)
    if removed:
        log.info("%s: removed old bank versions %s (INSPECT_KEEP_VERSIONS)", product, removed)
    return removed


def _summary(scores: list[float]) -> dict[str, float]:
    return {"mean": round(float(sum(scores) / len(scores)), 6), "max": round(max(scores), 6)}


# Images reduced to the backbone's input, with their original (width, height): what
# scoring needs of an image, without holding its decoded pixels.
Prepared = tuple[np.ndarray, list[tuple[int, int]]]


def add_images(
    product: str,
    features: np.ndarray,
    hashes: list[str],
    extractor: FeatureExtractor,
    *,
    reason: str = "",
    calibration: Prepared | None = None,
    batch_size: int = 8,
    records: list[str] | None = None,
) -> tuple[bentoml.Model, dict[str, Any]]:
    """A new live version whose bank also covers these defect-free images' features.

    `features` are computed by the caller before the lock (the backbone pass is the costly
    part and does not depend on the bank); under the lock the live bank is extended, so an
    update that landed meanwhile is extended too, never overwritten. The threshold is kept
    unless `calibration` images are given; then they set it, and the report says how their
    scores moved from the parent bank to the new one.
    """
    from detector.anomaly_detector import AnomalyDetector

    if not hashes:
        raise UserError("Send at least one defect-free image to add.")
    report: dict[str, Any] = {}
    held_out = len(calibration[1]) if calibration is not None else 0

    def make(parent: bentoml.Model | None) -> Draft:
        if parent is None:
            raise UnknownProductError(product, list_products())
        current = AnomalyDetector.from_bank(load_bank(parent), extractor, batch_size)
        learned, added = current.learned(features)
        report.update(bank_rows_before=current.bank.size, rows_added=added)
        if calibration is not None and held_out:
            before = current.predict_prepared(*calibration, with_maps=False)
            learned = learned.calibrated_on(learned.predict_prepared(*calibration, with_maps=False))
            report["calibration"] = {
                "images": held_out,
                "threshold_before": current.calibration.threshold,
                "threshold_after": learned.calibration.threshold,
                "scores_before": _summary([r.score for r in before]),
                "scores_after": _summary(learned.calibration.reference_scores),
            }
        report["bank_rows_after"] = learned.bank.size
        folder = learned.save(Path(scratch) / "bank")
        change = {
            "action": "recalibrate" if held_out else "add_images",
            "reason": reason,
            "added_images": len(hashes),
            "added_sha256": hashes,
            "rows_added": added,
            "calibration_images": held_out,
        }
        if records:  # reviewed false alarms: the version points back to their records
            change["records"] = list(records)
        return Draft(folder, change)

    with tempfile.TemporaryDirectory(prefix="bank-update-") as scratch:
        model = commit_version(product, make)
    return model, {"product": product, "version": str(model.tag.version), **report}


def _number(name: str, value: Any) -> float:
    """A JSON number as a float; true/false, text and lists are refused, not converted
    (the range checks that follow refuse NaN and infinities)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise UserError(f"{name} must be a number; it is {type(value).__name__} {value!r:.40}.")
    return float(value)


# An explicit threshold this far outside the calibration scores (above FAR x their highest,
# or below their lowest / FAR) would flag every part or none: it needs `confirm`.
FAR = 2.0


def _operating_point(target: Any, threshold: Any) -> tuple[float | None, float | None]:
    """(target, threshold) checked: exactly one of them, a real number in its range."""
    import math

    from detector.thresholds import check_target

    if (target is None) == (threshold is None):
        raise UserError("Give either a false-alarm target (e.g. 0.02) or a threshold, not both.")
    try:
        if target is not None:
            return check_target(_number("target", target)), None
        threshold = _number("threshold", threshold)
        if not math.isfinite(threshold) or threshold <= 0:
            raise ValueError(f"A threshold must be a finite number above 0; it is {threshold}.")
        return None, threshold
    except (TypeError, ValueError) as error:
        raise UserError(str(error)) from None


def _at_target(parent: bentoml.Model, before: Calibration, target: float) -> Calibration:
    """The version's rule applied to its calibration scores at a new false-alarm target."""
    from detector.scoring import calibrate

    if not before.reference_scores:
        raise UserError(
            f"{parent.tag} keeps no calibration scores to apply a target to: set a "
            "threshold, or add calibration images."
        )
    try:
        after = calibrate(
            before.reference_scores,
            target,
            before.reference_profiles,
            before.rule if before.rule != "explicit" else "empirical_quantile",
            before.source,
        )
    except ValueError as error:
        raise UserError(str(error)) from None
    return replace(after, rows_added_since=before.rows_added_since)  # the same scores


def _explicit(
    parent: bentoml.Model, before: Calibration, threshold: float, confirm: bool
) -> Calibration:
    """The calibration with an explicit threshold; one that would flag every part or none
    (far outside the calibration scores) only when confirmed."""
    from detector.scoring import check_threshold

    scores = before.reference_scores
    if scores and not confirm and not min(scores) / FAR <= threshold <= FAR * max(scores):
        raise UserError(
            f"A threshold of {threshold:.6g} is far outside {parent.tag}'s calibration "
            f"scores ({min(scores):.6g} to {max(scores):.6g}): it would flag every part "
            "or none. Send confirm: true (--confirm) if that is what you want."
        )
    return replace(before, threshold=check_threshold(threshold), rule="explicit")


def _from_reviews(before: Calibration, reviewed: dict[str, Any]) -> Calibration:
    """A suggestion's threshold with its defect-free records as the calibration scores; the
    drift reference stays the calibration images'."""
    return Calibration(
        float(reviewed["threshold"]),
        float(reviewed["target"]),
        [float(score) for score in reviewed["scores"]],
        before.reference_profiles,
        before.rule if before.rule != "explicit" else "empirical_quantile",
        "reviewed_records",
    )


def set_operating_point(
    product: str,
    *,
    target: float | None = None,
    threshold: float | None = None,
    reason: str = "",
    confirm: bool = False,
    reviewed: dict[str, Any] | None = None,
) -> tuple[bentoml.Model, dict[str, Any]]:
    """A new live version with the same bank rows and a new threshold: the version's rule
    applied to its calibration scores at a new false-alarm `target`, or an explicit
    `threshold`. It has history and rollback like any other change; nothing is refitted,
    and the new version shares its parent's index file.

    `reviewed` ({"threshold", "target", "scores"}: a threshold suggestion from reviewed
    records) makes those defect-free scores the version's calibration scores, so the
    version states the very rate the suggestion stated, computed the same way."""
    if reviewed is not None:
        target, threshold = None, reviewed["threshold"]
    target, threshold = _operating_point(target, threshold)
    report: dict[str, Any] = {}

    def make(parent: bentoml.Model | None) -> Draft:
        if parent is None:
            raise UnknownProductError(product, list_products())
        verify(parent)
        document = MemoryBank.read_document(parent.path)
        before = Calibration.from_dict(document.get("calibration", {}))
        if reviewed is not None:
            after = _from_reviews(before, reviewed)
        elif target is not None:
            after = _at_target(parent, before, target)
        else:
            after = _explicit(parent, before, threshold, confirm)  # type: ignore[arg-type]
        document["calibration"] = after.to_dict()
        folder = MemoryBank.write_document(Path(scratch) / "bank", document)
        report.update(
            threshold_before=before.threshold,
            threshold_after=after.threshold,
            before=before.estimate(),
            after=after.estimate(),
        )
        change = {
            "action": "operating_point",
            "reason": reason,
            "target": target,
            "threshold": after.threshold,
            "threshold_before": before.threshold,
        }
        return Draft(folder, change, index_of=parent)

    with tempfile.TemporaryDirectory(prefix="operating-point-") as scratch:
        model = commit_version(product, make)
    return model, {"product": product, "version": str(model.tag.version), **report}


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
