"""Locust load report: requests/s and latency percentiles at 1, 4 and 16 users, batching off
vs on, with the adaptive batch-size distribution from /metrics. All in one run.

    python -m benchmarks.load_report [--seconds 30] [--users 1 4 16]

ViT-S/16-shaped random DINOv3 at 448 px (see service_benchmark.py), 512 px synthetic uploads,
the locustfile's 16 : 3 : 1 mix of /inspect, /heatmap, /inspect_batch.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

import httpx

from benchmarks.service_benchmark import benchmark_store, served_throughput, upload_bytes
from detector.anomaly_detector import AnomalyDetector
from detector.images import decode_image
from devtools.local_server import REPO, bentoml_serve, locust_command, service_env

CONFIGS = {
    "batching off (default on CPU)": {"INSPECT_MAX_BATCH_SIZE": "1"},
    "batching max 4": {"INSPECT_MAX_BATCH_SIZE": "4"},
}


def batch_histogram(url: str) -> dict[str, float]:
    """Cumulative bucket counts of the runner's `score` batches, as Prometheus reports them."""
    buckets = {}
    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        if line.startswith("bentoml_service_adaptive_batch_size_bucket") and '"score"' in line:
            le = line.split('le="')[1].split('"')[0]
            buckets[le] = buckets.get(le, 0.0) + float(line.rsplit(" ", 1)[1])
    return buckets


def run_locust(url: str, users: int, seconds: int, prefix: Path) -> dict:
    subprocess.run(
        locust_command(url, users, seconds, prefix, "--image-size", "512"),
        cwd=REPO,
        env=service_env(prefix.parent),
        check=False,
        capture_output=True,
        timeout=seconds + 120,
    )
    with open(f"{prefix}_stats.csv") as handle:
        rows = {row["Name"]: row for row in csv.DictReader(handle)}
    total = rows["Aggregated"]
    per_second = {name: float(row["Requests/s"]) for name, row in rows.items()}
    # Every endpoint scores images on the runner: /inspect_batch posts 3 per request.
    images = sum(
        per_second.get(name, 0.0) * count
        for name, count in (("/inspect", 1), ("/heatmap", 1), ("/inspect_batch", 3))
    )
    return {
        "requests_per_s": round(float(total["Requests/s"]), 3),
        "images_per_s": round(images, 3),
        "p50_ms": float(total["50%"]),
        "p95_ms": float(total["95%"]),
        "p99_ms": float(total["99%"]),
        "failures": int(total["Failure Count"]),
        "requests": int(total["Request Count"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=30)
    parser.add_argument("--users", type=int, nargs="+", default=[1, 4, 16])
    args = parser.parse_args()
    os.environ.update(BENTOML_DO_NOT_TRACK="True", HF_HUB_OFFLINE="1")
    report: dict = {}
    with tempfile.TemporaryDirectory() as scratch_name:
        scratch = Path(scratch_name)
        model_dir, home = benchmark_store(scratch)
        uploads = upload_bytes(8)
        detector = AnomalyDetector.load(model_dir, device="cpu", batch_size=1)
        started = time.perf_counter()
        for data in uploads:
            detector.predict([decode_image(data)], with_maps=False)
        report["in_process_img_per_s"] = round(len(uploads) / (time.perf_counter() - started), 3)
        del detector
        for name, env in CONFIGS.items():
            with bentoml_serve(home, scratch / f"{name}.log", timeout=300, **env) as url:
                served_throughput(url, uploads, 4, 24)  # past the batcher's calibration
                before = batch_histogram(url)
                for users in args.users:
                    result = run_locust(url, users, args.seconds, scratch / f"{name}-{users}")
                    result["ratio_to_in_process"] = round(
                        result["images_per_s"] / report["in_process_img_per_s"], 3
                    )
                    report[f"{name}, {users} users"] = result
                    print(json.dumps({f"{name}, {users} users": result}), flush=True)
                after = batch_histogram(url)
                report[f"{name}: batch size buckets"] = {
                    le: after.get(le, 0) - before.get(le, 0) for le in after
                }
    print("RESULTS " + json.dumps(report))


if __name__ == "__main__":
    main()
