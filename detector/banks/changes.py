"""The changes an operator makes to a product's live bank, each a new version: images added
(reviewed false alarms, a new batch of material), a recalibration, a new operating point
(a false-alarm target, an explicit threshold, or the threshold from reviews), and an ignore
mask set or cleared (detector.masks says what a mask does)."""

from __future__ import annotations

import tempfile
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import bentoml
import numpy as np
from PIL import Image

from detector.banks.products import UnknownProductError, list_products, version_numbers
from detector.banks.versions import Draft, commit_document_change, commit_version, load_bank
from detector.errors import UserError
from detector.masks import MASK_KEY, grid_shape, mask_grid, to_document
from detector.provenance import added_names
from detector.quantized import recheck as recheck_int8
from detector.scoring import Calibration
from detector.thresholds import rule_for_new_scores

if TYPE_CHECKING:  # the backbone (torch) is imported by the runner only
    from detector.extractor import FeatureExtractor


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
    names: list[str] | None = None,
) -> tuple[bentoml.Model, dict[str, Any]]:
    """A new live version whose bank also covers these defect-free images' features.

    `features` are computed by the caller before the lock (the backbone pass is the costly
    part and does not depend on the bank); under the lock the live bank is extended, so an
    update that landed meanwhile is extended too. The threshold is kept unless `calibration`
    images set it (the report says how their scores moved); `names` name the images in the
    bank's provenance (default `added_names`)."""
    from detector.anomaly_detector import AnomalyDetector
    from detector.sessions import remember_images

    if not hashes:
        raise UserError("Send at least one defect-free image to add.")
    report: dict[str, Any] = {}
    held_out = len(calibration[1]) if calibration is not None else 0

    def make(parent: bentoml.Model | None) -> Draft:
        if parent is None:
            raise UnknownProductError(product, list_products())
        current = AnomalyDetector.from_bank(load_bank(parent), extractor, batch_size)
        learned, added = current.learned(features, names or added_names(hashes, records))
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
        remember_images(learned.bank.metadata, hashes)
        recheck_int8(learned, Path(parent.path))
        folder = learned.save(Path(scratch) / "bank")
        change = {"action": "recalibrate" if held_out else "add_images", "reason": reason}
        change.update(added_images=len(hashes), added_sha256=hashes, rows_added=added)
        change["calibration_images"] = held_out
        if records:  # reviewed false alarms: the version points back to their records
            change["records"] = list(records)
        return Draft(folder, change)

    with tempfile.TemporaryDirectory(prefix="bank-update-") as scratch:
        model = commit_version(product, make)
    return model, {"product": product, "version": str(model.tag.version), **report}


def add_session(
    product: str,
    session: str,
    features: np.ndarray,
    hashes: list[str],
    extractor: FeatureExtractor,
    *,
    join: str = "both",
    reason: str = "",
    batch_size: int = 8,
    names: list[str] | None = None,
) -> tuple[bentoml.Model, dict[str, Any]]:
    """A new live version with a later capture session's defect-free images in its bank,
    its calibration, or both (`join`; see detector.sessions), and the promise stated again.

    The session's images are scored by the live bank before any of their rows are added:
    a bank that has not seen the session, as leave-one-session-out scores each session.
    Its rows are named "session NAME: " and the image's name (`names`; default a hash)."""
    from detector.anomaly_detector import AnomalyDetector
    from detector.sessions import check_join, check_session_name, join_session

    check_session_name(session)
    check_join(join)
    if not hashes:
        raise UserError(f"Send at least one defect-free image of session {session!r}.")
    report: dict[str, Any] = {}

    def make(parent: bentoml.Model | None) -> Draft:
        if parent is None:
            raise UnknownProductError(product, list_products())
        current = AnomalyDetector.from_bank(load_bank(parent), extractor, batch_size)
        named = [f"session {session}: {label}" for label in names or [d[:12] for d in hashes]]
        joined = join_session(current, session, features, hashes, join, named)
        updated, added = joined.detector, joined.rows_added
        if joined.scores:
            report["session_scores"] = _summary(joined.scores)
        report.update(
            session=session,
            join=join,
            sessions=joined.names.to_dict(),
            bank_rows_before=current.bank.size,
            rows_added=added,
            bank_rows_after=updated.bank.size,
            threshold_before=current.calibration.threshold,
            threshold_after=updated.calibration.threshold,
            before=current.calibration.estimate(),
            after=updated.calibration.estimate(),
        )
        recheck_int8(updated, Path(parent.path))
        folder = updated.save(Path(scratch) / "bank")
        change = {"action": "add_session", "reason": reason, "session": session, "join": join}
        change.update(added_images=len(hashes), added_sha256=hashes, rows_added=added)
        return Draft(folder, change, index_of=parent if join == "calibration" else None)

    with tempfile.TemporaryDirectory(prefix="bank-session-") as scratch:
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
            rule_for_new_scores(before.rule),
            before.source,
            sessions=before.sessions,  # the same scores, from the same sessions
            session_names=before.session_names,
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
        rule_for_new_scores(before.rule),
        "reviewed_records",
        sessions=None,  # the line's own records: whatever sessions the line ran
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

    def edit(parent: bentoml.Model, document: dict[str, Any]) -> dict[str, Any]:
        before = Calibration.from_dict(document.get("calibration", {}))
        if reviewed is not None:
            after = _from_reviews(before, reviewed)
        elif target is not None:
            after = _at_target(parent, before, target)
        else:
            after = _explicit(parent, before, threshold, confirm)  # type: ignore[arg-type]
        document["calibration"] = after.to_dict()
        report.update(
            threshold_before=before.threshold,
            threshold_after=after.threshold,
            before=before.estimate(),
            after=after.estimate(),
        )
        return {
            "action": "operating_point",
            "reason": reason,
            "target": target,
            "threshold": after.threshold,
            "threshold_before": before.threshold,
        }

    model = commit_document_change(product, edit)
    return model, {"product": product, "version": str(model.tag.version), **report}


def set_mask(
    product: str, mask: Image.Image | None, reason: str = ""
) -> tuple[bentoml.Model, dict[str, Any]]:
    """A new live version whose frames are inspected only where `mask` is white (None:
    everywhere again). The bank rows, threshold and calibration scores are kept, and the
    change says they were measured over every patch: a masked frame's score is taken over
    fewer patches (it can only fall with the max rule). A later calibration session
    (add-images --session ... --join calibration) restates the rate under the mask."""
    report: dict[str, Any] = {}

    def edit(parent: bentoml.Model, document: dict[str, Any]) -> dict[str, Any]:
        before = (document.get(MASK_KEY) or {}).get("inspected_share", 1.0)
        if mask is None:
            document.pop(MASK_KEY, None)
        else:
            document[MASK_KEY] = to_document(mask_grid(mask, grid_shape(document)))
        after = (document.get(MASK_KEY) or {}).get("inspected_share", 1.0)
        report.update(inspected_share_before=before, inspected_share_after=after)
        return {
            "action": "mask",
            "reason": reason,
            "inspected_share": after,
            "calibration": "measured over every patch, before this mask",
        }

    model = commit_document_change(product, edit)
    return model, {"product": product, "version": str(model.tag.version), **report}


class ProductExistsError(UserError):
    """A new product under a name that has a bank already (HTTP 409)."""

    status, reason = 409, "product_exists"

    def __init__(self, product: str) -> None:
        super().__init__(
            f"A product named {product!r} exists already: choose another name, or add "
            f"images to it (POST /products/{product}/images)."
        )


def new_product(
    product: str,
    folder: Path,
    backbone_model: str,
    change: dict[str, Any],
    labels: dict[str, str] | None = None,
) -> bentoml.Model:
    """A product's first version, from a fitted detector's folder, live at once. Under the
    product's lock a product that has any version already is refused: a name made
    meanwhile (by another server sharing the store, or a command) is never overwritten."""

    def make(parent: bentoml.Model | None) -> Draft:
        if parent is not None or version_numbers(product):
            raise ProductExistsError(product)
        return Draft(folder, {"action": "fit", **change})

    return commit_version(product, make, backbone_model=backbone_model, labels=labels)
