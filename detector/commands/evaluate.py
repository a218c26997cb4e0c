"""Evaluate a fitted detector on the test split: metrics.json, roc.png, overlays.png.

python -m detector evaluate data.root=/data/mvtec data.category=carpet
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from detector.commands.config import CONFIG_PATH, runtime_options, start_test_run
from detector.commands.tracking import tracked
from detector.errors import exits_on_user_error
from detector.reports.evaluation import METRICS_FILE, EvaluationAccumulator

log = logging.getLogger(__name__)


def evaluate(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Score every test image with maps and write the metrics; returns the metrics dict."""
    with tracked(cfg, "evaluate") as run:
        metrics = _evaluate(cfg, run_dir)
        run.metrics(metrics)
        run.tags({"fingerprint": metrics["backbone"]["fingerprint"]})
        run.artifacts(*(run_dir / name for name in (METRICS_FILE, "roc.png", "overlays.png")))
    print(f"next: python -m detector export {cfg.model_dir} --metrics {run_dir / METRICS_FILE}")
    return metrics


def _evaluate(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    samples, detector = start_test_run(cfg, run_dir)
    accumulator = EvaluationAccumulator(
        eval_size=int(cfg.evaluation.pixel_eval_size),
        fpr_limit=float(cfg.evaluation.fpr_limit),
        grid_images=int(cfg.evaluation.grid_images),
    )
    predictions = detector.iter_predict([s.path for s in samples], progress=bool(cfg.progress))
    for sample, (image, result) in zip(samples, predictions, strict=True):
        accumulator.add(sample, result, image)
    extra = {
        "category": str(cfg.data.category),
        "model_dir": str(cfg.model_dir),
        "backbone": detector.extractor.spec.to_dict(),
        "random_weights": detector.extractor.random_weights,
        # What ran the backbone: the config's runtime, or the product's own int8 graph.
        "runtime": {
            **runtime_options(cfg.backbone),
            **getattr(detector.extractor, "hash_context", {}),
        },
        "threshold": detector.calibration.threshold,
        # How the threshold was set and what its calibration scores can show.
        "calibration": {
            "rule": detector.calibration.rule,
            "source": detector.calibration.source,
            **detector.calibration.estimate(),
        },
    }
    title = f"{cfg.data.category}: image ROC"
    metrics = accumulator.write(run_dir, detector.calibration.threshold, title, extra)
    log.info(
        "image AUROC %s, pixel AUROC %s, AUPRO %s, F1-max %s -> %s",
        *(metrics.get(k) for k in ("image_auroc", "pixel_auroc", "aupro", "image_f1_max")),
        run_dir,
    )
    return metrics


@hydra.main(config_path=CONFIG_PATH, config_name="config", version_base="1.3")
@exits_on_user_error
def main(cfg: DictConfig) -> None:
    evaluate(cfg, Path(HydraConfig.get().runtime.output_dir))


if __name__ == "__main__":
    main()
