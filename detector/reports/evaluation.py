"""Collect scored test images and write metrics.json, roc.png and overlays.png.

Used by `python -m detector evaluate` and by the batch job's `--evaluate`, so a folder
scored offline gets exactly the numbers the evaluator would print. Maps and masks are kept
at a small square size only, so memory stays flat on large test sets.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from detector.data.mvtec import Sample, load_mask
from detector.metrics import all_metrics
from detector.reports.plots import save_overlay_grid, save_roc_curve
from detector.scoring import InspectionResult

METRICS_FILE = "metrics.json"


def _shrink_map(anomaly_map: np.ndarray, size: int) -> np.ndarray:
    image = Image.fromarray(anomaly_map.astype(np.float32), mode="F")
    return np.asarray(image.resize((size, size), Image.Resampling.BILINEAR))


@dataclass
class EvaluationAccumulator:
    eval_size: int = 256
    fpr_limit: float = 0.3
    grid_images: int = 24
    labels: list[int] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    defect_types: list[str] = field(default_factory=list)
    maps: list[np.ndarray] = field(default_factory=list)
    masks: list[np.ndarray | None] = field(default_factory=list)
    thumbnails: list[Image.Image] = field(default_factory=list)
    names: list[str] = field(default_factory=list)

    def add(self, sample: Sample, result: InspectionResult, image: Image.Image) -> None:
        if result.anomaly_map is None:
            raise ValueError("evaluation needs anomaly maps: predict with with_maps=True")
        self.labels.append(sample.label)
        self.scores.append(result.score)
        self.defect_types.append(sample.defect_type)
        self.maps.append(_shrink_map(result.anomaly_map, self.eval_size))
        self.masks.append(load_mask(sample, (self.eval_size, self.eval_size)))
        self.thumbnails.append(image.resize((self.eval_size, self.eval_size)))
        self.names.append(f"{sample.defect_type}/{sample.path.name}")

    def _grid_indices(self) -> list[int]:
        """Round-robin over defect types so the grid shows every kind, not just the first."""
        by_type: dict[str, list[int]] = {}
        for index, defect in enumerate(self.defect_types):
            by_type.setdefault(defect, []).append(index)
        chosen: list[int] = []
        while len(chosen) < min(self.grid_images, len(self.labels)):
            for indices in by_type.values():
                if indices and len(chosen) < self.grid_images:
                    chosen.append(indices.pop(0))
        return sorted(chosen)

    def metrics(self) -> dict[str, Any]:
        with_mask = [i for i, mask in enumerate(self.masks) if mask is not None]
        masks = np.stack([self.masks[i] for i in with_mask]) if with_mask else None
        maps = np.stack([self.maps[i] for i in with_mask]) if with_mask else None
        results: dict[str, Any] = all_metrics(
            np.array(self.labels), np.array(self.scores), masks, maps, self.fpr_limit
        )
        results.update(
            n_images=len(self.labels),
            n_defective=int(sum(self.labels)),
            n_without_mask=len(self.labels) - len(with_mask),
            fpr_limit=self.fpr_limit,
            pixel_eval_size=self.eval_size,
        )
        return results

    def write(self, out_dir: Path, threshold: float, title: str, extra: dict[str, Any]) -> dict:
        """Write metrics.json (+ extra fields), roc.png and overlays.png; return the metrics."""
        out_dir.mkdir(parents=True, exist_ok=True)
        metrics = {**self.metrics(), **extra}
        (out_dir / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
        if metrics["image_auroc"] is not None:
            save_roc_curve(np.array(self.labels), np.array(self.scores), out_dir / "roc.png", title)
        chosen = self._grid_indices()
        save_overlay_grid(
            [self.thumbnails[i] for i in chosen],
            [self.maps[i] for i in chosen],
            [self.masks[i] for i in chosen],
            [f"{self.names[i]}\n{self.scores[i]:.4f}" for i in chosen],
            threshold,
            out_dir / "overlays.png",
        )
        return metrics
