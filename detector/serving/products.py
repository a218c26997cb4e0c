"""Products and their bank versions in the BentoML model store: history, live version, rollback.

A product (`carpet`, `line3-grey`) is the BentoML model `bank-<product>`; each change to its
bank (a fit, added images, a recalibration, a rollback) is a new version `v1`, `v2`, ... whose
metadata says what changed, from which parent, why and when. So `bentoml models list` shows
every product and version, and `bentoml models export` carries a version with its history.

The live version is the newest one. Rollback copies an earlier version's files into a new
version rather than moving a pointer, so history stays a straight line and "live" never needs
anything but the store to be known. Writers take a per-product file lock (every worker and
every replica sharing the store), so two concurrent updates both land, one on top of the
other. After a version is complete, its number is written to `<store>/bank-<product>/live`
(atomically): readers poll that one small file, and never see a half-copied version.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import bentoml
import numpy as np

from detector.backbone import FeatureExtractor
from detector.errors import UserError
from detector.memory_bank import INDEX_FILE, METADATA_FILE, MemoryBank
from detector.scoring import Calibration

BANK_PREFIX = "bank-"
LIVE_FILE = "live"
LOCK_FILE = ".update.lock"
PRODUCT_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,57}$")
VERSION_NAME = re.compile(r"^v(\d+)$")


class UnknownProductError(UserError):
    """A product no bank exists for; HTTP 404 with the known names."""

    def __init__(self, name: str | None, known: list[str]) -> None:
        listed = (
            ", ".join(known) or "none yet: export a fitted bank with `python -m detector export`"
        )
        if name is None:
            message = f"Name the product (form field 'product'); known products: {listed}."
        else:
            message = f"Unknown product {name!r}; known products: {listed}."
        super().__init__(message)
        self.name, self.known = name, known


class VersionError(UserError):
    """A bank version that does not exist (HTTP 404)."""


def check_product(name: str) -> str:
    if not isinstance(name, str) or not PRODUCT_NAME.match(name):
        raise UserError(
            f"Product name {name!r} is not valid: use lowercase letters, digits, '-', '_' or "
            "'.', starting with a letter or digit, at most 58 characters."
        )
    return name


def model_name(product: str) -> str:
    return BANK_PREFIX + check_product(product)


def store_dir() -> Path:
    """The BentoML model store folder ($BENTOML_HOME/models)."""
    from bentoml._internal.configuration.containers import BentoMLContainer

    return Path(BentoMLContainer.model_store_dir.get())


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
    """'vN' of the live version: the pointer file, or the newest complete version."""
    folder = _product_dir(product)
    try:
        version = (folder / LIVE_FILE).read_text().strip()
        # A version deleted with `bentoml models delete` falls back to the newest one left.
        if VERSION_NAME.match(version) and (folder / version / "model.yaml").exists():
            return version
    except OSError:
        pass
    numbers = _numbers(product)
    return f"v{numbers[-1]}" if numbers else None


def live_model(product: str) -> bentoml.Model:
    version = live_version(product)
    if version is None:
        raise UnknownProductError(product, list_products())
    return bentoml.models.get(f"{model_name(product)}:{version}")


def version_model(product: str, version: str | int) -> bentoml.Model:
    version = f"v{version}" if str(version).isdigit() else str(version)
    if not VERSION_NAME.match(version) or int(version[1:]) not in _numbers(product):
        known = ", ".join(f"v{n}" for n in _numbers(product)) or "none"
        raise VersionError(f"{product} has no bank version {version!r}; versions: {known}.")
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
    folder = _product_dir(product)
    with tempfile.NamedTemporaryFile("w", dir=folder, delete=False, prefix=".live-") as handle:
        handle.write(version + "\n")
    os.replace(handle.name, folder / LIVE_FILE)


def _storable(value: Any) -> Any:
    """BentoML metadata holds no None: absent keys say "none" instead."""
    if isinstance(value, dict):
        return {key: _storable(item) for key, item in value.items() if item is not None}
    if isinstance(value, list | tuple):
        return [_storable(item) for item in value]
    return value


# What `make` returns: the folder holding the new bank's files, and its change record.
Draft = tuple[Path, dict[str, Any]]


def commit_version(
    product: str,
    make: Callable[[bentoml.Model | None], Draft],
    *,
    backbone_model: str | None = None,
    labels: dict[str, str] | None = None,
    metrics: dict[str, Any] | None = None,
) -> bentoml.Model:
    """Make a new version from the live one, under the product's lock, and make it live.

    `make(parent)` builds the new bank's files from the live version (None for a product's
    first version) while no other writer can change that version.
    """
    with product_lock(product):
        parent = live_model(product) if live_version(product) else None
        numbers = _numbers(product)
        number = numbers[-1] + 1 if numbers else 1
        folder, change = make(parent)
        bank = MemoryBank.load(folder)
        calibration = bank.metadata.get("calibration", {})
        inherited = parent.info.metadata if parent is not None else {}
        backbone = backbone_model or inherited.get("backbone_model")
        if backbone is None:
            raise UserError("a product's first bank version must name its backbone model")
        record = {
            "time": datetime.now(UTC).isoformat(timespec="seconds"),
            "parent": str(parent.tag) if parent is not None else None,
            **change,
        }
        metadata = {
            "product": product,
            "version": number,
            "change": record,
            "extractor": bank.metadata["extractor"],
            "backbone_model": backbone,
            "bank_size": bank.size,
            "threshold": calibration.get("threshold"),
            "calibration": calibration_summary(calibration),
            "metrics": metrics if metrics is not None else inherited.get("metrics", {}),
        }
        all_labels = {
            "kind": "memory-bank",
            "product": product,
            "version": str(number),
            "action": str(change.get("action", "change")),
            **(labels or {}),
        }
        with bentoml.models.create(
            f"{model_name(product)}:v{number}", labels=all_labels, metadata=_storable(metadata)
        ) as model:
            for filename in (INDEX_FILE, METADATA_FILE):
                shutil.copy2(folder / filename, Path(model.path) / filename)
        _write_live(product, f"v{number}")
    return bentoml.models.get(f"{model_name(product)}:v{number}")


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


def history(product: str) -> list[dict[str, Any]]:
    """Every version of a product, oldest first, with what changed and why."""
    if not _numbers(product):
        raise UnknownProductError(product, list_products())
    live = live_version(product)
    return [
        {**describe(version_model(product, number)), "live": f"v{number}" == live}
        for number in _numbers(product)
    ]


def rollback(product: str, version: str | int, reason: str = "") -> bentoml.Model:
    """A new live version with an earlier version's exact files (and so its exact scores)."""
    target = version_model(product, version)

    def make(parent: bentoml.Model | None) -> Draft:
        change = {"action": "rollback", "restored": str(target.tag.version), "reason": reason}
        return Path(target.path), change

    return commit_version(product, make, metrics=target.info.metadata.get("metrics", {}))


def _summary(scores: list[float]) -> dict[str, float]:
    return {"mean": round(float(sum(scores) / len(scores)), 6), "max": round(max(scores), 6)}


def add_images(
    product: str,
    features: np.ndarray,
    hashes: list[str],
    extractor: FeatureExtractor,
    *,
    reason: str = "",
    calibration_images: list[Any] | None = None,
    batch_size: int = 8,
    records: list[str] | None = None,
) -> tuple[bentoml.Model, dict[str, Any]]:
    """A new live version whose bank also covers these defect-free images' features.

    `features` are computed by the caller before the lock (the backbone pass is the costly
    part and does not depend on the bank); under the lock the live bank is extended, so an
    update that landed meanwhile is extended too, never overwritten. The threshold is kept
    unless `calibration_images` are given; then they set it, and the report says how their
    scores moved from the parent bank to the new one.
    """
    from detector.anomaly_detector import AnomalyDetector

    if not hashes:
        raise UserError("Send at least one defect-free image to add.")
    report: dict[str, Any] = {}

    def make(parent: bentoml.Model | None) -> Draft:
        if parent is None:
            raise UnknownProductError(product, list_products())
        current = AnomalyDetector.from_bank(MemoryBank.load(parent.path), extractor, batch_size)
        learned, added = current.learned(features)
        report.update(bank_rows_before=current.bank.size, rows_added=added)
        if calibration_images:
            before = [r.score for r in current.predict(calibration_images, with_maps=False)]
            learned = learned.recalibrated(calibration_images)
            report["calibration"] = {
                "images": len(calibration_images),
                "threshold_before": current.calibration.threshold,
                "threshold_after": learned.calibration.threshold,
                "scores_before": _summary(before),
                "scores_after": _summary(learned.calibration.reference_scores),
            }
        report["bank_rows_after"] = learned.bank.size
        folder = learned.save(Path(scratch) / "bank")
        change = {
            "action": "recalibrate" if calibration_images else "add_images",
            "reason": reason,
            "added_images": len(hashes),
            "added_sha256": hashes,
            "rows_added": added,
            "calibration_images": len(calibration_images or []),
        }
        if records:  # reviewed false alarms: the version points back to their records
            change["records"] = list(records)
        return folder, change

    with tempfile.TemporaryDirectory(prefix="bank-update-") as scratch:
        model = commit_version(product, make)
    return model, {"product": product, "version": str(model.tag.version), **report}


def set_operating_point(
    product: str,
    *,
    target: float | None = None,
    threshold: float | None = None,
    reason: str = "",
) -> tuple[bentoml.Model, dict[str, Any]]:
    """A new live version with the same bank rows and a new threshold: the version's rule
    applied to its calibration scores at a new false-alarm `target`, or an explicit
    `threshold`. It has history and rollback like any other change; nothing is refitted."""
    import math

    from detector.scoring import calibrate, check_threshold
    from detector.thresholds import check_target

    if (target is None) == (threshold is None):
        raise UserError("Give either a false-alarm target (e.g. 0.02) or a threshold, not both.")
    try:
        if target is not None:
            target = check_target(target)
        else:
            threshold = float(threshold)  # type: ignore[arg-type]
            if not math.isfinite(threshold) or threshold <= 0:
                raise ValueError(f"A threshold must be a finite number above 0; it is {threshold}.")
    except (TypeError, ValueError) as error:
        raise UserError(str(error)) from None
    report: dict[str, Any] = {}

    def make(parent: bentoml.Model | None) -> Draft:
        if parent is None:
            raise UnknownProductError(product, list_products())
        bank = MemoryBank.load(parent.path)
        before = Calibration.from_dict(bank.metadata.get("calibration", {}))
        if target is not None:
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
        else:
            after = Calibration(
                check_threshold(threshold),  # type: ignore[arg-type]
                before.false_alarm_rate,
                before.reference_scores,
                before.reference_profiles,
                "explicit",
                before.source,
            )
        bank.metadata["calibration"] = after.to_dict()
        folder = bank.save(Path(scratch) / "bank")
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
        return folder, change

    with tempfile.TemporaryDirectory(prefix="operating-point-") as scratch:
        model = commit_version(product, make)
    return model, {"product": product, "version": str(model.tag.version), **report}


def scoring_versions(product: str) -> tuple[bentoml.Model, list[str]]:
    """The live version, and the tags of the versions whose scores equal its scores: it and
    the versions before it that only moved the operating point (same bank rows), back to
    the one that set the rows. Records of these are on the live version's scale."""
    live = live_model(product)
    tags = [str(live.tag)]
    model = live
    while model.info.metadata.get("change", {}).get("action") == "operating_point":
        parent = model.info.metadata["change"].get("parent")
        if not parent:
            break
        model = bentoml.models.get(parent)
        tags.append(str(model.tag))
    return live, tags
