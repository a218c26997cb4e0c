"""Training-free visual inspection: patch features, a memory bank, calibrated scores.

The library is this folder's modules (extractor, dino, runtimes, backbone, greedy, coreset,
spill, memory_bank, scoring, anomaly_detector, fitting, images, drift, metrics, schema,
files, environment, errors) and banks/ (the bank store); data/, reports/, records/,
commands/ and serving/ are the layers built on it (README, "Layout"). The main names
are importable from here, loaded on first use so that `import detector.schema` stays
light (no torch, no faiss):

    from detector import AnomalyDetector, MemoryBank, BackboneSpec
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "AnomalyDetector": "detector.anomaly_detector",
    "BackboneSpec": "detector.extractor",
    "FeatureExtractor": "detector.extractor",
    "build_extractor": "detector.backbone",
    "MemoryBank": "detector.memory_bank",
    "BankConfig": "detector.memory_bank",
    "Calibration": "detector.scoring",
    "InspectionResult": "detector.scoring",
    "ScoringConfig": "detector.scoring",
    "UserError": "detector.errors",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'detector' has no attribute {name!r}")
