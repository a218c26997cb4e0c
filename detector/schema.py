"""The inspection result as the outside world sees it, defined once.

The service's JSON answer, the batch job's journal row, its CSV columns and the load test's
checks are all built from these names, so a field added here reaches every one of them and
none can drift from the others. Standard library only: the Locust client imports it.
"""

from __future__ import annotations

import math
from typing import Any

# What scoring decides about one image (InspectionResult.to_dict gives exactly these).
RESULT_FIELDS = (
    "score",
    "threshold",
    "normalized_score",
    "is_anomalous",
    "image_width",
    "image_height",
)
# Which stored models decided: nested as {"models": {...}} in JSON answers, flat in rows.
MODEL_FIELDS = ("backbone", "bank")
ROW_MODEL_COLUMNS = tuple(f"{name}_model" for name in MODEL_FIELDS)
# One row per file of a batch job: results.csv's columns, in order.
CSV_COLUMNS = ("path", *RESULT_FIELDS, *ROW_MODEL_COLUMNS, "error")
# An answer that refuses an input instead of scoring it.
ERROR_FIELDS = ("error", "reason")


def answer(
    result: dict[str, Any], models: dict[str, str], random_weights: bool, demo: bool = False
) -> dict[str, Any]:
    """The service's JSON for one scored image: the result fields plus who decided, and
    whether that was a random-weight or demo model (never to be trusted on a line)."""
    return {
        **{key: result[key] for key in RESULT_FIELDS},
        "models": {name: models[name] for name in MODEL_FIELDS},
        "random_weights": random_weights,
        "demo": demo,
    }


def row(path: str, answer_: dict[str, Any]) -> dict[str, Any]:
    """A batch journal row from a service answer (or an in-process one of the same shape).

    The drift profile is kept when present so a resumed or merged run's drift statistic
    counts every image, not only those scored by the last process.
    """
    return {
        "path": path,
        **{key: answer_[key] for key in RESULT_FIELDS},
        **{
            column: answer_["models"][name]
            for name, column in zip(MODEL_FIELDS, ROW_MODEL_COLUMNS, strict=True)
        },
        "error": "",
        "drift_profile": answer_.get("drift_profile"),
    }


def error_row(path: str, message: str) -> dict[str, Any]:
    return {"path": path, "error": message}


def check_answer(result: object) -> str | None:
    """Why an answer is not a well-formed, self-consistent result, or None when it is."""
    if not isinstance(result, dict) or not result.keys() >= set(RESULT_FIELDS):
        return f"missing keys in {result!r:.200}"
    numbers = [result[key] for key in ("score", "threshold", "normalized_score")]
    if not all(isinstance(value, int | float) and math.isfinite(value) for value in numbers):
        return "score, threshold or normalized_score is not a finite number"
    if not result["threshold"] > 0:
        return "threshold is not positive"
    if abs(result["normalized_score"] - result["score"] / result["threshold"]) > 1e-6:
        return "normalized_score != score / threshold"
    if result["is_anomalous"] != (result["score"] > result["threshold"]):
        return "verdict disagrees with score and threshold"
    return None
