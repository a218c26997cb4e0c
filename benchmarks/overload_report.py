"""Overload: Locust at twice what the service accepts, then normal traffic again.

    python -m benchmarks.overload_report [--seconds 60] [--users 32] [--max-queue 16]

ViT-S/16-shaped random DINOv3 at 448 px (the benchmark bank), 512 px uploads. The service
accepts `--max-queue` requests at once (INSPECT_MAX_QUEUE), so `--users` closed-loop Locust
users (default twice that) keep it beyond capacity for the whole run. Reports the answers by
status (accepted, 503 + Retry-After, any other failure), the p50/p95 latency of accepted
requests against the budget the queue implies (queue length x the idle per-request
latency), whether the server stayed up, and the latency once the load is gone.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

from benchmarks.service_benchmark import benchmark_store, upload_bytes
from devtools.local_server import REPO, bentoml_serve, locust_command, service_env


def idle_latency(url: str, upload: bytes, count: int = 5) -> float:
    """Median seconds of sequential /inspect requests on an otherwise idle service."""
    seconds = []
    for _ in range(count):
        started = time.perf_counter()
        files = {"image": ("x.png", upload, "image/png")}
        httpx.post(f"{url}/inspect", files=files, timeout=120).raise_for_status()
        seconds.append(time.perf_counter() - started)
    return float(np.median(seconds))


def locust_rows(prefix: Path) -> dict[str, dict[str, str]]:
    with open(f"{prefix}_stats.csv") as handle:
        return {row["Name"]: row for row in csv.DictReader(handle)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=60)
    parser.add_argument("--max-queue", type=int, default=16)
    parser.add_argument("--users", type=int, help="default: twice --max-queue")
    args = parser.parse_args()
    users = args.users or 2 * args.max_queue
    with tempfile.TemporaryDirectory() as scratch_name:
        scratch = Path(scratch_name)
        _, home = benchmark_store(scratch)
        upload = upload_bytes(1)[0]
        settings = {"INSPECT_MAX_QUEUE": str(args.max_queue)}
        with bentoml_serve(home, scratch / "serve.log", timeout=300, **settings) as url:
            idle = idle_latency(url, upload)
            prefix = scratch / "overload"
            command = locust_command(url, users, args.seconds, prefix, "--image-size", "512")
            run = subprocess.run(
                command, cwd=REPO, env=service_env(scratch), capture_output=True, text=True
            )
            alive = httpx.get(f"{url}/livez", timeout=10).status_code == 200
            time.sleep(2)
            after = idle_latency(url, upload)
        rows = locust_rows(prefix)
    accepted = {n: row for n, row in rows.items() if n.startswith("/") and "503" not in n}
    refused = {name: row for name, row in rows.items() if "503 overloaded" in name}
    aggregated = rows["Aggregated"]
    results = {
        "users": users,
        "max_queue": args.max_queue,
        "seconds": args.seconds,
        "locust_exit_code": run.returncode,
        "idle_latency_s": round(idle, 3),
        "budget_s": round(args.max_queue * idle, 2),
        "requests": int(aggregated["Request Count"]),
        "accepted": {name: int(row["Request Count"]) for name, row in accepted.items()},
        "refused_503": {name: int(row["Request Count"]) for name, row in refused.items()},
        "failures_other_than_503": int(aggregated["Failure Count"]),
        "accepted_inspect_p50_s": int(accepted["/inspect"]["50%"]) / 1000,
        "accepted_inspect_p95_s": int(accepted["/inspect"]["95%"]) / 1000,
        "server_alive_after": alive,
        "latency_after_load_s": round(after, 3),
        "after_over_idle": round(after / idle, 3),
    }
    print("RESULTS " + json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
