"""A product's served precision in the store: its int8 check run again as a new version.

The check's scores depend on the bank's rows and mask; changes that bring images run it
themselves (detector.banks.changes), a mask change cannot (it has no backbone at hand) and
leaves the product in f32 until this runs (detector.int8_check).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import bentoml

from detector.banks.versions import commit_document_change, load_bank
from detector.errors import UserError
from detector.extractor import FeatureExtractor
from detector.int8_check import INT8_KEY, has_graph, status
from detector.quantized import recheck


def check_int8(
    product: str,
    extractor: FeatureExtractor,
    *,
    batch_size: int = 8,
    num_threads: int | None = None,
) -> tuple[bentoml.Model, dict[str, Any]]:
    """A new live version whose int8 check was run again, on the stored check images with
    the live rows, mask and threshold: after a mask change, which leaves it stale (served in
    f32 until then). `extractor` is the shared f32 backbone."""
    from detector.anomaly_detector import AnomalyDetector

    report: dict[str, Any] = {}

    def edit(parent: bentoml.Model, document: dict[str, Any]) -> dict[str, Any]:
        current = AnomalyDetector.from_bank(load_bank(parent), extractor, batch_size)
        if not document.get(INT8_KEY) or not has_graph(Path(parent.path)):
            raise UserError(
                f"{product} ({parent.tag}) has no int8 graph to check: it was fitted with "
                "precision f32, or its version lost the graph. Fit it with precision=int8."
            )
        recheck(current, Path(parent.path), num_threads)
        report.update(status(current.bank.metadata, current.bank.size) or {})
        document[INT8_KEY] = current.bank.metadata[INT8_KEY]
        return {"action": "check_int8", "int8": report["check"]}

    model = commit_document_change(product, edit)
    return model, {"product": product, "version": str(model.tag.version), "int8": report}
