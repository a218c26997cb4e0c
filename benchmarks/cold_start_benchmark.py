"""`bentoml serve` to `/readyz`, this checkout against an older commit, in one run.

    python -m benchmarks.cold_start_benchmark [--baseline 76e1595] [--rounds 3]
        [--runtime torch]

Each checkout exports the same fitted bank (ViT-S/16-shaped random DINOv3 at 448 px, 2,195
rows) with its own `detector export` into a model store of its own; the servers then start
alternately, `--rounds` times each, and the medians are compared. Where the time goes is
measured beside it, each stage in a fresh process: the imports of the serve process and
of each worker (`import service`), torch, transformers, and loading the backbone both ways.
Goal (issue 26): 10 s or less with the default runtime on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.service_benchmark import build_models
from devtools.local_server import REPO, bentoml_serve, checkout_of, export_models, service_env

# Each stage in a fresh interpreter: (name, code that prints its own seconds).
STAGES = {
    "import torch": "import torch",
    "import transformers' DINOv3": "from transformers import DINOv3ViTModel",
    "import service (serve process and each worker)": "import service",
    "eager backbone (transformers, from_pretrained)": (
        "from detector.dino import DinoBackbone; DinoBackbone(FOLDER, resolution=448)"
    ),
    "traced backbone (torch.jit.load)": (
        "from pathlib import Path; from detector.traced import TracedBackbone, find_trace;"
        "TracedBackbone(find_trace(Path(FOLDER), 448, (-1,)))"
    ),
}


def stage_seconds(code: str, home: Path, folder: Path) -> float:
    """Seconds `code` takes in a fresh interpreter, imports included (torch for the
    backbones: each stage is what a process that starts there pays)."""
    timed = (
        f"import time; _t = time.perf_counter(); FOLDER = {str(folder)!r}\n{code}\n"
        "print(time.perf_counter() - _t)"
    )
    result = subprocess.run(
        [sys.executable, "-c", timed],
        cwd=REPO,
        env=service_env(home),
        capture_output=True,
        text=True,
        timeout=300,
    )
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-2000:])
    return float(result.stdout.split()[-1])


def time_to_ready(home: Path, repo: Path, log: Path, runtime: str) -> float:
    started = time.perf_counter()
    with bentoml_serve(home, log, timeout=300, repo=repo, INSPECT_RUNTIME=runtime):
        return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default="76e1595", help="the older commit")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--runtime", default="torch")
    args = parser.parse_args()
    os.environ.update(BENTOML_DO_NOT_TRACK="True", HF_HUB_OFFLINE="1")
    with tempfile.TemporaryDirectory(prefix="cold-start-") as scratch_name:
        scratch = Path(scratch_name)
        model_dir = build_models(scratch, bank_rows=2195)
        with checkout_of(args.baseline, scratch) as old:
            checkouts = {args.baseline: old, "this checkout": REPO}
            homes = {name: scratch / f"home-{index}" for index, name in enumerate(checkouts)}
            for name, repo in checkouts.items():
                exported = export_models(model_dir, homes[name], repo=repo)
                assert exported.returncode == 0, exported.stderr[-3000:]
            seconds: dict[str, list[float]] = {name: [] for name in checkouts}
            stages: dict[str, list[float]] = {name: [] for name in STAGES}
            (backbone,) = (homes["this checkout"] / "models" / "dino-backbone").glob("*/model.yaml")
            for round_index in range(args.rounds):
                for name, repo in checkouts.items():
                    log = scratch / f"serve-{round_index}-{len(seconds[name])}.log"
                    seconds[name].append(time_to_ready(homes[name], repo, log, args.runtime))
                for stage, code in STAGES.items():
                    home = homes["this checkout"]
                    stages[stage].append(stage_seconds(code, home, backbone.parent))
                print(json.dumps({k: [round(v, 2) for v in s] for k, s in seconds.items()}))
    before, after = (statistics.median(seconds[name]) for name in checkouts)
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    flags = [f for f in ("avx2", "avx512f", "avx512_vnni", "amx_bf16") if f" {f}" in cpu]
    print(f"\n{os.cpu_count()} CPUs ({', '.join(flags)}), runtime {args.runtime}")
    print(f"| `bentoml serve` to /readyz | {args.baseline} | this checkout | before / after |")
    print("| --- | ---: | ---: | ---: |")
    runs = " | ".join(", ".join(f"{v:.1f}" for v in seconds[name]) for name in checkouts)
    print(f"| runs (s) | {runs} | |")
    print(f"| median (s) | {before:.1f} | {after:.1f} | {before / after:.2f} |")
    print("\n| stage, fresh process | median s |\n| --- | ---: |")
    for stage, values in stages.items():
        print(f"| {stage} | {statistics.median(values):.2f} |")


if __name__ == "__main__":
    main()
