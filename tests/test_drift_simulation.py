"""`python -m detector simulate-drift`: a table and plots per shift x severity, real bank."""

from __future__ import annotations

import csv
from pathlib import Path

from PIL import Image

from devtools.in_process import run_detector

REPO = Path(__file__).resolve().parents[1]


def run_drift(tmp_path: Path, model_dir: Path, root: Path, backbone: Path, *extra: str):
    command = [
        "simulate-drift",
        "data=synthetic",
        f"data.root={root}",
        "backbone=tiny_random",
        f"backbone.name={backbone}",
        f"model_dir={model_dir}",
        "progress=false",
        f"hydra.run.dir={tmp_path / 'drift'}",
        *extra,
    ]
    return run_detector(tmp_path, *command)


def test_drift_report_covers_every_severity_and_shows_brightness_hurting(
    tmp_path: Path, saved_detector_dir: Path, synthetic_root: Path, tiny_backbone_dir: Path
) -> None:
    result = run_drift(
        tmp_path,
        saved_detector_dir,
        synthetic_root,
        tiny_backbone_dir,
        "drift.only=[brightness,blur]",
        "drift.shifts.brightness=[1.1,1.5]",
    )
    assert result.returncode == 0, result.stderr
    out = tmp_path / "drift"
    with (out / "drift.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["shift"], r["severity"]) for r in rows] == [
        ("none", "0"),
        ("brightness", "1"),
        ("brightness", "2"),
        *[("blur", str(severity)) for severity in range(1, 6)],
    ]
    baseline, strong = rows[0], rows[2]
    assert strong["parameter"] == "1.5"
    assert float(strong["drift_statistic"]) > float(baseline["drift_statistic"]) + 0.5
    assert float(strong["false_alarm_rate"]) >= float(baseline["false_alarm_rate"])
    assert float(strong["mean_normalized_score_good"]) > float(
        baseline["mean_normalized_score_good"]
    )
    assert float(baseline["image_auroc"]) >= 0.9  # the unshifted set is the evaluation's
    assert "| brightness | 2 | 1.5 |" in (out / "drift.md").read_text()
    for metric in ("image_auroc", "false_alarm_rate", "detection_rate", "drift_statistic"):
        with Image.open(out / f"{metric}.png") as plot:
            assert plot.size[0] > 300


def test_unknown_shift_is_one_sentence(
    tmp_path: Path, saved_detector_dir: Path, synthetic_root: Path, tiny_backbone_dir: Path
) -> None:
    result = run_drift(
        tmp_path, saved_detector_dir, synthetic_root, tiny_backbone_dir, "drift.only=[fog]"
    )
    assert result.returncode == 2
    assert "error: unknown or unconfigured shift(s) fog" in result.stderr
    assert "Traceback" not in result.stderr
