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
from typing import Any

import numpy as np

from detector.scoring import Calibration
from detector.thresholds import check_target, rule_named


def rates(good: np.ndarray, defective: np.ndarray, threshold: float) -> dict[str, Any]:
    return {
        "threshold": round(float(threshold), 8),
        "false_alarm_rate": round(float(np.mean(good > threshold)), 6) if good.size else None,
        "detection_rate": (
            round(float(np.mean(defective > threshold)), 6) if defective.size else None
        ),
    }


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
    }
    report["defect_free_scores"] = [float(score) for score in good]  # for applying it
    if good_scores.size:
        suggested = rule_named(rule).threshold(good_scores, target)
        report["suggested"] = rates(good_scores, defect_scores, suggested)
        # The estimate the version it makes will state (products.set_operating_point).
        calibration = Calibration(suggested, target, good.copy(), source="reviewed_records")
        estimate = calibration.estimate()
        report["suggested"]["expected_false_alarm_rate"] = estimate["expected_false_alarm_rate"]
        report["suggested"]["upper_bound"] = estimate["upper_bound"]
        report["suggested"]["statement"] = estimate["statement"]
    return report
