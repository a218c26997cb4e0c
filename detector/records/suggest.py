"""A threshold from the line's own reviewed decisions.

Reviews give the score distributions the calibration could only guess: parts operators
marked false alarms and parts not flagged are defect-free (as far as the line knows), parts
marked confirmed defects are defective. Flagged parts nobody reviewed yet are left out, and
counted, since they could be either. The suggestion is the threshold rule applied to the
line's defect-free scores at the target, with the rates it would have given on these
records next to the current threshold's.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import timedelta
from typing import Any

import numpy as np

from detector.records.errors import RecordsError
from detector.records.model import utc_now
from detector.records.store import RecordStore
from detector.scoring import Calibration
from detector.thresholds import check_target, rule_for_new_scores, rule_named


def rates(good: np.ndarray, defective: np.ndarray, threshold: float) -> dict[str, Any]:
    return {
        "threshold": round(float(threshold), 8),
        "false_alarm_rate": round(float(np.mean(good > threshold)), 6) if good.size else None,
        "detection_rate": (
            round(float(np.mean(defective > threshold)), 6) if defective.size else None
        ),
    }


TRADE_OFF_BINS = 100


def trade_off(good: np.ndarray, defective: np.ndarray, current: float) -> dict[str, Any]:
    """The reviewed scores as two histograms on shared bins, from 0 to past the highest
    score and the threshold: what the page draws, and moves a threshold line over (rates
    read at bin edges are exact; a few hundred numbers, however many records)."""
    good, defective = (
        np.asarray([v for v in a.tolist() if v is not None and np.isfinite(v)], np.float64)
        for a in (good, defective)
    )
    top = max([current * 1.5, *(float(a.max()) * 1.02 for a in (good, defective) if a.size)])
    edges = np.round(np.linspace(0.0, top, TRADE_OFF_BINS + 1), 8)

    def counts(scores: np.ndarray) -> list[int]:
        # Bins (edge_i, edge_i+1]: the counts from bin i up are the scores above edge_i,
        # as the service flags them (a score equal to the threshold is not flagged).
        bins = np.clip(np.searchsorted(edges, scores, side="left") - 1, 0, TRADE_OFF_BINS - 1)
        return np.bincount(bins, minlength=TRADE_OFF_BINS).tolist()

    return {"edges": edges.tolist(), "defect_free": counts(good), "defective": counts(defective)}


def suggest_threshold(
    records: Iterable[dict[str, Any]],
    current: float,
    target: float,
    rule: str = "empirical_quantile",
) -> dict[str, Any]:
    """Rates at the `current` threshold and at the one `rule` sets for `target` on the
    records' defect-free scores; None as the suggestion when there are none."""
    check_target(target)
    good, defective, unreviewed = [], [], 0
    for record in records:
        label = record.get("review_label")
        if label == "confirmed_defect":
            defective.append(record["score"])
        elif label == "false_alarm" or (label is None and not record["is_anomalous"]):
            good.append(record["score"])
        elif label is None:
            unreviewed += 1
    good_scores, defect_scores = np.asarray(good), np.asarray(defective)
    report: dict[str, Any] = {
        "target_false_alarm_rate": target,
        "defect_free_records": int(good_scores.size),
        "confirmed_defects": int(defect_scores.size),
        "unreviewed_alarms_left_out": unreviewed,
        "current": rates(good_scores, defect_scores, current),
        "suggested": None,
        "trade_off": trade_off(good_scores, defect_scores, current),
    }
    report["defect_free_scores"] = [float(score) for score in good]  # for applying it
    if good_scores.size:
        suggested = rule_named(rule).threshold(good_scores, target)
        report["suggested"] = rates(good_scores, defect_scores, suggested)
        # The estimate the version it makes will state (changes.set_operating_point).
        calibration = Calibration(
            suggested, target, good.copy(), source="reviewed_records", sessions=None
        )
        estimate = calibration.estimate()
        report["suggested"]["expected_false_alarm_rate"] = estimate["expected_false_alarm_rate"]
        report["suggested"]["upper_bound"] = estimate["upper_bound"]
        report["suggested"]["statement"] = estimate["statement"]
    return report


class UnknownProduct(RecordsError):
    status, reason = 404, "unknown_product"


def apply_suggestion(
    store: RecordStore, product: str, target: float | None, days: float, reason: str
) -> dict[str, Any]:
    """The suggestion made a new version, whose calibration scores are the suggestion's
    defect-free records: it states the rate the suggestion stated."""
    from detector.banks import changes

    report = threshold_suggestion(store, product, target, days, keep_scores=True)
    if report["suggested"] is None:
        raise RecordsError(f"No defect-free records of {product} to set a threshold from.")
    reviewed = {
        "threshold": report["suggested"]["threshold"],
        "target": report["target_false_alarm_rate"],
        "scores": report.pop("defect_free_scores"),
    }
    model, applied = changes.set_operating_point(product, reason=reason, reviewed=reviewed)
    report["applied"] = {
        "version": applied["version"],
        "threshold": applied["threshold_after"],
        "statement": applied["after"].get("statement"),
        "expected_false_alarm_rate": applied["after"].get("expected_false_alarm_rate"),
    }
    return report


def threshold_suggestion(
    store: RecordStore,
    product: str,
    target: float | None,
    days: float = 7,
    keep_scores: bool = False,
) -> dict[str, Any]:
    """Rates at the live threshold and at one set from the reviewed records of the
    versions on the live version's scale (`versions.scoring_versions`)."""
    from detector.banks import products, versions

    try:
        live, tags = versions.scoring_versions(products.check_product(product))
    except products.UnknownProductError as error:
        raise UnknownProduct(str(error)) from None
    calibration = live.info.metadata.get("calibration", {})
    goal = calibration.get("target_false_alarm_rate", 0.01) if target is None else target
    rule = calibration.get("rule", "empirical_quantile")
    since = utc_now() - timedelta(days=days)
    records = store.iterate(since=since, product=product, bank_models=tags)
    try:
        report = suggest_threshold(
            records,
            float(live.info.metadata["threshold"]),
            goal,
            rule_for_new_scores(rule),
        )
    except ValueError as error:
        raise RecordsError(str(error)) from None
    other = {
        tag: count for tag, count in store.counts_by_bank(since, product).items() if tag not in tags
    }
    left_out = {
        "unreviewed_alarms": report["unreviewed_alarms_left_out"],
        "other_scale": {"records": sum(other.values()), "versions": other},
    }
    if not keep_scores:
        report.pop("defect_free_scores")
    return {
        "product": product,
        "version": str(live.tag.version),
        "versions": tags,
        "days": days,
        **report,
        "left_out": left_out,
        "left_out_statement": _left_out_statement(tags, left_out),
    }


def _left_out_statement(tags: list[str], left_out: dict[str, Any]) -> str:
    """What the suggestion did not count, and why, in one sentence."""
    scale = ", ".join(tag.split(":")[-1] for tag in tags)
    parts = []
    if left_out["unreviewed_alarms"]:
        parts.append(
            f"{left_out['unreviewed_alarms']} flagged records not yet reviewed (either kind)"
        )
    other = left_out["other_scale"]
    if other["records"]:
        listed = ", ".join(tag.split(":")[-1] for tag in sorted(other["versions"]))
        parts.append(
            f"{other['records']} records scored by {listed}, whose bank had other rows "
            f"(images were added or it was refitted since): their scores are not on the "
            f"scale of {scale}"
        )
    if not parts:
        return f"Every record of the window is counted (versions {scale})."
    return f"Counted the records of {scale}; left out: " + "; ".join(parts) + "."
