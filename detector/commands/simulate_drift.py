"""Drift simulation: how the fitted detector behaves when the line's images change.

    python -m detector simulate-drift data.root=/data/mvtec data.category=carpet
    python -m detector simulate-drift data=synthetic backbone=tiny_random drift.only=[brightness]

Every test image is shifted (conf/drift.yaml: brightness, contrast, blur, noise, JPEG,
rotation, scale, colour cast, camera position) at each severity and scored through the
same `AnomalyDetector` the service uses. For every shift x severity the report gives the
image AUROC (does it still rank defects above normal parts?), the false-alarm rate of
defect-free images at the calibrated threshold (does the line stop for nothing?), the
detection rate of defective ones, and the drift statistic the service would show for that
traffic, so an operator can read a gauge value as "about this much blur".

Writes drift.csv, drift.md and one plot per metric into the Hydra run folder.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import hydra
import numpy as np
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from tqdm import tqdm

from detector.anomaly_detector import AnomalyDetector
from detector.commands.config import CONFIG_PATH, start_test_run
from detector.commands.tracking import tracked
from detector.data.mvtec import Sample
from detector.data.shifts import SHIFTS, apply_shift
from detector.drift import DriftSettings, drift_report
from detector.errors import exits_on_user_error
from detector.images import read_image
from detector.metrics import image_auroc
from detector.reports.plots import save_severity_plot

log = logging.getLogger(__name__)
METRICS = ("image_auroc", "false_alarm_rate", "detection_rate", "drift_statistic")
COLUMNS = ("shift", "severity", "parameter", *METRICS, "mean_normalized_score_good")


def _rate(flags: Sequence[bool]) -> float | None:
    return round(float(np.mean(flags)), 4) if len(flags) else None


def score_condition(
    detector: AnomalyDetector,
    samples: Sequence[Sample],
    images: Sequence[Image.Image],
    reference: np.ndarray,
) -> dict[str, Any]:
    """Metrics of one set of (possibly shifted) test images."""
    results = detector.predict(list(images), with_maps=False)
    labels = np.array([sample.label for sample in samples])
    scores = np.array([result.score for result in results])
    good = [result for result, label in zip(results, labels, strict=True) if label == 0]
    bad = [result for result, label in zip(results, labels, strict=True) if label == 1]
    settings = DriftSettings(window_size=max(1, len(good)), min_images=1)
    drift = drift_report(reference, [r.drift_profile for r in good], settings) if good else {}
    auroc = image_auroc(labels, scores)
    return {
        "image_auroc": round(auroc, 4) if auroc is not None else None,
        "false_alarm_rate": _rate([r.is_anomalous for r in good]),
        "detection_rate": _rate([r.is_anomalous for r in bad]),
        "drift_statistic": drift.get("statistic"),
        "mean_normalized_score_good": (
            round(float(np.mean([r.normalized_score for r in good])), 4) if good else None
        ),
    }


def simulate(
    detector: AnomalyDetector,
    samples: Sequence[Sample],
    shifts: dict[str, Sequence[float]],
    seed: int,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """One row for the unshifted set, then one per shift x severity."""
    originals = [read_image(sample.path) for sample in samples]
    reference = np.asarray(detector.calibration.reference_profiles, dtype=np.float32)
    rows = [
        {"shift": "none", "severity": 0, "parameter": None}
        | score_condition(detector, samples, originals, reference)
    ]
    conditions = [(name, i + 1, p) for name, ps in shifts.items() for i, p in enumerate(ps)]
    for name, severity, parameter in tqdm(conditions, desc="drift", disable=not progress):
        shifted = [
            apply_shift(image, name, parameter, seed=seed + index)
            for index, image in enumerate(originals)
        ]
        metrics = score_condition(detector, samples, shifted, reference)
        rows.append({"shift": name, "severity": severity, "parameter": parameter} | metrics)
    return rows


def _cell(value: Any) -> str:
    return "" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def write_report(rows: list[dict[str, Any]], out_dir: Path, title: str) -> dict[str, Path]:
    """drift.csv, drift.md and <metric>.png for each metric; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out_dir / "drift.csv", "markdown": out_dir / "drift.md"}
    with paths["csv"].open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows({key: row.get(key) for key in COLUMNS} for row in rows)
    lines = [f"# {title}", "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cell(row.get(key)) for key in COLUMNS) + " |" for row in rows]
    paths["markdown"].write_text("\n".join(lines) + "\n")
    baseline = next(row for row in rows if row["shift"] == "none")
    for metric in METRICS:
        curves = {
            name: [(0, baseline[metric])]
            + [(row["severity"], row[metric]) for row in rows if row["shift"] == name]
            for name in dict.fromkeys(row["shift"] for row in rows if row["shift"] != "none")
        }
        paths[metric] = save_severity_plot(curves, metric, out_dir / f"{metric}.png")
    return paths


def selected_shifts(drift_cfg: DictConfig) -> dict[str, list[float]]:
    shifts = OmegaConf.to_container(drift_cfg.shifts)
    wanted = list(drift_cfg.only) if drift_cfg.get("only") else list(shifts)
    unknown = [name for name in wanted if name not in SHIFTS or name not in shifts]
    if unknown:
        raise ValueError(
            f"unknown or unconfigured shift(s) {', '.join(unknown)}: choose from "
            f"{', '.join(name for name in shifts if name in SHIFTS)}"
        )
    return {name: [float(p) for p in shifts[name]] for name in wanted}


def run(cfg: DictConfig, run_dir: Path) -> list[dict[str, Any]]:
    shifts = selected_shifts(cfg.drift)  # refuse an unknown shift before loading anything
    samples, detector = start_test_run(cfg, run_dir)
    if not detector.calibration.reference_profiles:
        log.warning(
            "this bank has no drift reference: refit it or run "
            "`python -m detector set-drift-reference MODEL_DIR IMAGE_DIR`"
        )
    with tracked(cfg, "simulate-drift") as tracked_run:
        rows = simulate(detector, samples, shifts, int(cfg.seed), bool(cfg.progress))
        title = f"Drift simulation: {cfg.data.category}, model {cfg.model_dir}"
        paths = write_report(rows, run_dir, title)
        for row in rows:  # one metric per shift x severity, e.g. brightness_3.false_alarm_rate
            condition = f"{row['shift']}_{row['severity']}"
            tracked_run.metrics({f"{condition}.{key}": row.get(key) for key in METRICS})
        tracked_run.tags({"fingerprint": detector.extractor.spec.fingerprint})
        tracked_run.artifacts(*paths.values())
    log.info("drift report for %d conditions -> %s", len(rows), run_dir)
    print(f"report: {paths['markdown']} (plots beside it)")
    return rows


@hydra.main(config_path=CONFIG_PATH, config_name="drift", version_base="1.3")
@exits_on_user_error
def main(cfg: DictConfig) -> None:
    run(cfg, Path(HydraConfig.get().runtime.output_dir))


if __name__ == "__main__":
    main()
