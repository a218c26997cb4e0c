"""What the scoring runner does, apart from its BentoML declarations in service.py.

It decodes uploads, scores them through `AnomalyDetector` (the object the batch job and the
evaluator use too) and keeps the drift window of the traffic it has seen.

Uploads arrive as their encoded bytes and are decoded here, not in the API: on a CPU machine
the API process competes with the ViT for the same cores, and every millisecond it spent
decoding cost the runner about a millisecond (docs/PERFORMANCE.md). Decoding here also sends
~1 MB per image between the services instead of a 3 MB array.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from detector.anomaly_detector import AnomalyDetector
from detector.drift import DriftMonitor, profile_to_list
from detector.images import InvalidImageError, decode_image
from detector.scoring import InspectionResult
from detector.serving import telemetry
from detector.serving.model_store import ModelTags
from detector.serving.settings import Settings

log = logging.getLogger("inspection")


class ScoringRunner:
    """One detector, its drift window and a decoding pool; answers are plain dicts."""

    def __init__(self, detector: AnomalyDetector, tags: ModelTags, settings: Settings) -> None:
        self.detector = detector
        self.settings = settings
        bank = detector.bank.metadata
        self.info = {
            "backbone_model": tags.backbone,
            "bank_model": tags.bank,
            "category": bank.get("category", "unknown"),
            "random_weights": detector.extractor.random_weights,
            "demo": bool(bank.get("demo", False)),
            "threshold": detector.calibration.threshold,
            "extractor": detector.extractor.spec.to_dict(),
            "runtime": settings.runtime,
            "precision": settings.precision,
        }
        telemetry.publish_model_info(self.info)
        self.drift = DriftMonitor(
            np.asarray(detector.calibration.reference_profiles), settings.drift
        )
        if not self.drift.reference.size:
            log.warning(
                "the bank has no drift reference (fitted before drift monitoring existed): "
                "refit it, or set one with `python -m detector set-drift-reference`"
            )
        telemetry.publish_drift(self.drift.status())
        # Pillow's decoders and resize release the GIL: a batch's uploads decode in parallel.
        self.decoder = ThreadPoolExecutor(
            max_workers=settings.num_threads or 2, thread_name_prefix="decode"
        )

    def _prepare(self, upload: bytes) -> tuple[np.ndarray, tuple[int, int]] | InvalidImageError:
        """Decode and preprocess one upload; a bad one becomes its error, never the batch's."""
        try:
            image = decode_image(
                upload, max_bytes=self.settings.max_bytes, max_pixels=self.settings.max_pixels
            )
            return self.detector.prepare(image)
        except InvalidImageError as error:
            return error
        except Exception as error:  # a decoder bug on one upload must not fail its batch-mates
            log.warning("could not decode an upload: %r", error)
            return InvalidImageError("corrupt", f"The image could not be decoded: {error}")

    def _answer(self, result: InspectionResult, with_maps: bool) -> dict[str, Any]:
        answer = {**result.to_dict(), "drift_profile": profile_to_list(result.drift_profile)}
        if with_maps:
            answer["anomaly_map"] = result.anomaly_map
        return answer

    def score_uploads(self, uploads: list[bytes], with_maps: bool) -> list[dict[str, Any]]:
        """One answer per upload, in order: a result, or {error, reason, status}.

        Maps are made at most `heatmap_max_side` long (all the API draws), and every answer
        carries the drift status after it, so the API answers /drift without a call here.
        """
        prepared = list(self.decoder.map(self._prepare, uploads))
        good = [item for item in prepared if not isinstance(item, InvalidImageError)]
        results: list[InspectionResult] = []
        status = self.drift.status()
        if good:
            arrays = np.stack([array for array, _ in good])
            sizes = [size for _, size in good]
            results = self.detector.predict_prepared(
                arrays, sizes, with_maps, self.settings.heatmap_max_side
            )
            status = self.drift.add([r.drift_profile for r in results])
            telemetry.publish_drift(status)
        answers = iter(self._answer(result, with_maps) for result in results)
        return [
            {"error": item.message, "reason": item.reason, "status": item.status, "drift": status}
            if isinstance(item, InvalidImageError)
            else {**next(answers), "drift": status}
            for item in prepared
        ]

    def model_info(self) -> dict[str, Any]:
        """What is served, with the drift reference and status (the API keeps them)."""
        return {
            **self.info,
            "drift": self.drift.status(),
            "drift_reference": self.drift.reference.tolist(),
        }
