"""Generate the synthetic carpet set, fit, evaluate, export and serve: the whole loop.

    python -m detector demo [--out demo] [--backbone dinov3_vits16] [--serve] [--port 3000]

Uses real DINOv3 weights when they can be loaded (hub access with HF_TOKEN, or
`--backbone-path` to a local folder). Otherwise it falls back to a tiny random backbone and
says loudly that the numbers it prints mean nothing about detection quality.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from hydra import compose, initialize_config_module

from detector.commands.evaluate import evaluate
from detector.commands.fit import fit
from detector.commands.readiness import wait_until_ready
from detector.errors import exits_on_user_error
from detector.extractor import BackboneUnavailableError

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


def export_demo(model_dir: Path, metrics_file: Path) -> None:
    """Mark the bank as a demo model and save both models to the BentoML store."""
    from detector.commands import export
    from detector.memory_bank import MemoryBank

    bank = MemoryBank.load(model_dir)
    bank.metadata["demo"] = True  # shown by `bentoml models get`, /model_info and the page
    bank.save(model_dir)
    backbone, bank_model = export.export_models(model_dir, metrics=metrics_file)
    print(f"saved models {backbone.tag} and {bank_model.tag} (marked demo)")


def serve(port: int) -> None:
    """`bentoml serve` on loopback in the foreground of this checkout, with an admin key
    made for this run only; the printed page address carries it after '#' (never sent to
    the server, so never in a log), as Jupyter's token does."""
    import os
    import secrets

    key = secrets.token_urlsafe(24)
    load_test_key = secrets.token_urlsafe(24)  # for the README's Locust line
    command = [sys.executable, "-m", "bentoml", "serve", "service:InspectionAPI"]
    env = {
        **os.environ,
        "INSPECT_ADMIN_KEY": key,
        "INSPECT_API_KEYS": f"locust=loadtest:{load_test_key}",
    }
    checkout = Path(__file__).resolve().parents[2]  # where service.py is
    process = subprocess.Popen(
        [*command, "--host", "127.0.0.1", "--port", str(port)], cwd=checkout, env=env
    )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_ready(url, process, timeout=300)
        print(
            f"\nServing the DEMO model on this machine only: open {url}/ui/#key={key}\n"
            f"(this run's admin key; for curl: export INSPECT_KEY={key} and send "
            '-H "X-API-Key: $INSPECT_KEY"; Ctrl-C stops the server)\n'
            f"Load test, kept out of records and drift: export INSPECT_LOAD_TEST_KEY="
            f"{load_test_key}; locust -f locustfile.py --host {url} --headless -u 4 -r 4 -t 30s",
            flush=True,
        )
        process.wait()
    except RuntimeError as error:  # it never answered: stop it and say why
        process.terminate()
        raise SystemExit(f"{error}.") from None
    except KeyboardInterrupt:
        process.terminate()
        process.wait(timeout=30)


@exits_on_user_error
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("demo"))
    parser.add_argument("--backbone", default="dinov3_vits16", help="a conf/backbone option")
    parser.add_argument("--backbone-path", help="local folder with real DINOv3 weights")
    parser.add_argument(
        "--serve", action="store_true", help="export to the BentoML store and serve it"
    )
    parser.add_argument("--port", type=int, default=3000)
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
    if args.serve:
        export_demo(out / "model", out / "evaluate" / "metrics.json")
        serve(args.port)
    else:
        print(f"next: python -m detector export {out / 'model'} && bentoml serve")


if __name__ == "__main__":
    main()
