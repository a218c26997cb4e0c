"""Augmentation on or off: evaluation metrics, bank size, speed, and rotation/brightness drift.

    python -m benchmarks.augmentation_report [--backbone tiny_random] [--resolution 224]
        [--out outputs/augmentation] [--markdown docs/AUGMENTATION.md]

Fits the synthetic carpet set twice through `detector fit` (augment=none and
augment=texture, same seed and data), evaluates both through `detector evaluate`, and runs
`detector simulate-drift` for rotation and brightness on both, so the only difference is
the augmentation. Prints one Markdown report and writes it to --markdown. With random
weights the numbers show the mechanics (bank growth, cost, how robustness moves), not
DINOv3's detection quality.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from hydra import compose, initialize_config_module

from detector.commands.evaluate import evaluate
from detector.commands.fit import fit
from detector.commands.simulate_drift import run as run_drift

OPTIONS = ("none", "texture")


def config(out: Path, backbone: str, resolution: int, augment: str, config_name: str):
    overrides = [
        "data=synthetic",
        f"data.root={out / 'data'}",
        f"backbone={backbone}",
        f"backbone.resolution={resolution}",
        f"augment={augment}",
        f"model_dir={out / ('model-' + augment)}",
        "progress=false",
        "num_threads=2",
        # 80 training images with a quarter held out: 20 calibration images make the
        # threshold (and so the false-alarm rates below) far less noisy than the default 4.
        "data.generate.n_train=80",
        "data.generate.n_test_good=20",
        "calibration_fraction=0.25",
    ]
    if config_name == "drift":
        overrides.append("drift.only=[rotation,brightness]")
    with initialize_config_module("detector.conf", version_base="1.3"):
        return compose(config_name, overrides=overrides)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="vits16_random")
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--out", type=Path, default=Path("outputs/augmentation"))
    parser.add_argument("--markdown", type=Path, default=Path("outputs/augmentation/report.md"))
    args = parser.parse_args()
    out = args.out.resolve()
    results = {}
    for augment in OPTIONS:
        cfg = config(out, args.backbone, args.resolution, augment, "config")
        started = time.perf_counter()
        fit(cfg, out / f"fit-{augment}")
        fit_seconds = time.perf_counter() - started
        summary = json.loads((out / f"fit-{augment}" / "fit_summary.json").read_text())
        started = time.perf_counter()
        metrics = evaluate(cfg, out / f"evaluate-{augment}")
        evaluate_seconds = time.perf_counter() - started
        drift_rows = run_drift(
            config(out, args.backbone, args.resolution, augment, "drift"), out / f"drift-{augment}"
        )
        results[augment] = {
            "summary": summary,
            "metrics": metrics,
            "fit_seconds": fit_seconds,
            "seconds_per_test_image": evaluate_seconds / metrics["n_images"],
            "drift": drift_rows,
        }
    report = render(results, args)
    args.markdown.parent.mkdir(parents=True, exist_ok=True)
    args.markdown.write_text(report)
    print(report)


def render(results: dict, args: argparse.Namespace) -> str:
    plain, augmented = results["none"], results["texture"]
    lines = [
        "# Training augmentation: on or off",
        "",
        f"Command: `python -m benchmarks.augmentation_report --backbone {args.backbone} "
        f"--resolution {args.resolution}` (synthetic carpet set: 60 bank + 20 calibration "
        "images, 20 good and 20 defective test images; seed 0; 2 CPU threads).",
        "Backbone with RANDOM weights: the numbers show the mechanics (bank growth, cost, "
        "how robustness to rotation moves), not how well real DINOv3 features detect defects.",
        "",
        "| | augment=none | augment=texture | ratio |",
        "|---|---|---|---|",
    ]

    def row(name: str, a: float, b: float, digits: int = 4) -> str:
        ratio = f"{b / a:.2f}" if a else ""
        return f"| {name} | {a:.{digits}f} | {b:.{digits}f} | {ratio} |"

    for key in ("image_auroc", "pixel_auroc", "aupro", "image_f1_max"):
        lines.append(row(key, plain["metrics"][key], augmented["metrics"][key]))
    for key in ("n_train_features", "bank_size"):
        lines.append(row(key, plain["summary"][key], augmented["summary"][key], 0))
    lines.append(row("fit seconds", plain["fit_seconds"], augmented["fit_seconds"], 1))
    lines.append(
        row(
            "evaluate seconds / image",
            plain["seconds_per_test_image"],
            augmented["seconds_per_test_image"],
            3,
        )
    )
    lines += [
        "",
        "Under drift (`detector simulate-drift`, same shifted images for both banks): "
        "false-alarm rate on defect-free images at each bank's own calibrated threshold, "
        "and image AUROC.",
        "",
        "| shift | severity | parameter | false alarms none | false alarms texture "
        "| AUROC none | AUROC texture |",
        "|---|---|---|---|---|---|---|",
    ]
    for a, b in zip(plain["drift"], augmented["drift"], strict=True):
        lines.append(
            f"| {a['shift']} | {a['severity']} | {a['parameter'] or ''} | "
            f"{a['false_alarm_rate']} | {b['false_alarm_rate']} | "
            f"{a['image_auroc']} | {b['image_auroc']} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
