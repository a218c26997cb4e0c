"""Generate the synthetic carpet set, fit and evaluate: the whole loop in one command.

    python -m detector demo [--out demo] [--backbone dinov3_vits16]

Uses real DINOv3 weights when they can be loaded (hub access with HF_TOKEN, or
`--backbone-path` to a local folder). Otherwise it falls back to a tiny random backbone and
says loudly that the numbers it prints mean nothing about detection quality.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from hydra import compose, initialize_config_module

from detector.backbone import BackboneUnavailableError
from detector.commands.evaluate import evaluate
from detector.commands.fit import fit
from detector.errors import exits_on_user_error

WARNING = """
!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!
!! {reason}
!! Falling back to a TINY RANDOM backbone: the pipeline runs end to end, but the scores
!! and metrics below say NOTHING about how well DINOv3 detects defects.
!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!
"""


def demo_config(out: Path, backbone: str, extra: list[str]):
    overrides = [
        "data=synthetic",
        f"data.root={out / 'data'}",
        f"backbone={backbone}",
        f"model_dir={out / 'model'}",
        *extra,
    ]
    if backbone == "tiny_random":
        overrides.append(f"backbone.name={out / 'tiny-random-dinov3'}")
    with initialize_config_module("detector.conf", version_base="1.3"):
        return compose("config", overrides=overrides)


@exits_on_user_error
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("demo"))
    parser.add_argument("--backbone", default="dinov3_vits16", help="a conf/backbone option")
    parser.add_argument("--backbone-path", help="local folder with real DINOv3 weights")
    args, hydra_overrides = parser.parse_known_args()
    out = args.out.resolve()
    extra = list(hydra_overrides)
    if args.backbone_path:
        extra.append(f"backbone.name={Path(args.backbone_path).resolve()}")
    cfg = demo_config(out, args.backbone, extra)
    try:
        fit(cfg, out / "fit")
    except BackboneUnavailableError as error:
        print(WARNING.format(reason=error), file=sys.stderr)
        cfg = demo_config(out, "tiny_random", [e for e in extra if not e.startswith("backbone.")])
        fit(cfg, out / "fit")
    metrics = evaluate(cfg, out / "evaluate")
    if metrics.get("random_weights"):
        print(WARNING.format(reason="This run used random weights."), file=sys.stderr)
    keys = ("image_auroc", "pixel_auroc", "aupro", "image_f1_max", "threshold")
    print(json.dumps({key: metrics.get(key) for key in keys}, indent=2))
    print(f"model: {out / 'model'}\nmetrics and pictures: {out / 'evaluate'}")


if __name__ == "__main__":
    main()
