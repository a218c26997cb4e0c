"""Served throughput and CPU per image with OpenMP's threads spinning or sleeping between
parallel regions (`OMP_WAIT_POLICY`), interleaved in one run.

    python -m benchmarks.wait_policy_benchmark [--clients 1 4] [--rounds 2]

The runner's torch and faiss threads spin after each parallel region by default (GNU
OpenMP), on the cores the API worker, the batch job's decoders and the clients need. Same
store as `benchmarks.service_benchmark` (ViT-S/16-shaped random DINOv3 at 448 px, a
2,195-row bank, 1024 px PNG uploads). For each policy a fresh `bentoml serve`, rounds
alternating; prints img/s and the service's CPU-seconds per image (runner + API + arbiter,
from their process times), and the ratios PASSIVE / default.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import psutil

from benchmarks.service_benchmark import benchmark_store, served_throughput, upload_bytes
from devtools.local_server import bentoml_serve

POLICIES = {"default": "", "passive": "PASSIVE"}


def service_cpu_seconds() -> float:
    """User + system seconds of every process this one started (the server's)."""
    total = 0.0
    for process in psutil.Process().children(recursive=True):
        try:
            times = process.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def measure(home: Path, policy: str, uploads: list[bytes], clients: list[int]) -> dict:
    """One fresh server with `policy`: per client count, (img/s, service CPU-s per image)."""
    log = Path(tempfile.gettempdir()) / f"wait_policy_{policy or 'default'}.log"
    extra = {"OMP_WAIT_POLICY": policy} if policy else {}
    results = {}
    with bentoml_serve(home, log, timeout=300, **extra) as url:
        served_throughput(url, uploads, 2, 8)  # warm the path and the batcher
        for count in clients:
            total = max(8, 4 * count)
            before = service_cpu_seconds()
            rate, _ = served_throughput(url, uploads, count, total)
            results[count] = (rate, (service_cpu_seconds() - before) / total)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    os.environ.update(BENTOML_DO_NOT_TRACK="True", HF_HUB_OFFLINE="1")
    os.environ.pop("OMP_WAIT_POLICY", None)  # the default policy is the library's own
    runs: dict[str, list[dict]] = {name: [] for name in POLICIES}
    with tempfile.TemporaryDirectory() as scratch:
        _, home = benchmark_store(Path(scratch))
        uploads = upload_bytes(8)
        for _ in range(args.rounds):  # alternating: this machine's speed drifts over minutes
            for name, policy in POLICIES.items():
                started = time.perf_counter()
                runs[name].append(measure(home, policy, uploads, args.clients))
                print(f"{name}: {time.perf_counter() - started:.0f} s", flush=True)
    summary = {}
    for count in args.clients:
        mean = {
            name: [sum(run[count][i] for run in rounds) / len(rounds) for i in (0, 1)]
            for name, rounds in runs.items()
        }
        summary[f"{count}_clients"] = {
            "img_per_s": {name: round(values[0], 3) for name, values in mean.items()},
            "service_cpu_s_per_image": {name: round(values[1], 3) for name, values in mean.items()},
            "throughput_passive_over_default": round(mean["passive"][0] / mean["default"][0], 3),
            "cpu_passive_over_default": round(mean["passive"][1] / mean["default"][1], 3),
        }
    print("RESULTS " + json.dumps({"cpus": psutil.cpu_count(), **summary}))


if __name__ == "__main__":
    main()
