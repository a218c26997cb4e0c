"""Served throughput with inspection records on and off, measured in one run.

    python -m benchmarks.records_benchmark [--images 32] [--clients 4] [--rounds 2]

ViT-S/16-shaped random DINOv3 at 448 px (service_benchmark.py), 1024 px PNG uploads, 4
concurrent clients on /inspect. Three servers per round, started in turn so that drift in
the machine's speed hits every configuration alike: recording off; on with the default
(images kept for flagged parts only); on keeping every image (the most disk work). Prints
each configuration's images/s and its ratio to recording off in the same round, and the CPU
milliseconds per image of the API and runner processes (steadier than throughput on a shared
machine: recording's own cost shows there first).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import httpx

from benchmarks.service_benchmark import benchmark_store, served_throughput, upload_bytes
from devtools.local_server import bentoml_serve, service_cpu_seconds

CONFIGS = {
    "records off": {"INSPECT_RECORDS": "off"},
    "records on (keep flagged images)": {"INSPECT_RECORDS": "on"},
    "records on (keep every image)": {"INSPECT_RECORDS": "on", "INSPECT_KEEP_IMAGES": "all"},
}


def written(url: str) -> float:
    total = 0.0
    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        if line.startswith('inspection_records_total{outcome="written"}'):
            total += float(line.rsplit(" ", 1)[1])
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    os.environ.update(BENTOML_DO_NOT_TRACK="True", HF_HUB_OFFLINE="1")
    report: dict = {"rounds": []}
    with tempfile.TemporaryDirectory() as scratch_name:
        scratch = Path(scratch_name)
        _, home = benchmark_store(scratch)
        uploads = upload_bytes(8)
        for round_number in range(args.rounds):
            result = {}
            for name, env in CONFIGS.items():
                records = scratch / f"records-{round_number}-{len(result)}"
                log = scratch / f"{name}-{round_number}.log"
                with bentoml_serve(
                    home, log, timeout=300, INSPECT_RECORDS_DIR=str(records), **env
                ) as url:
                    served_throughput(url, uploads, args.clients, 8)  # warm-up
                    cpu_before = service_cpu_seconds(url)
                    per_second, _ = served_throughput(url, uploads, args.clients, args.images)
                    cpu_after = service_cpu_seconds(url)
                    result[name] = {"images_per_s": round(per_second, 3)}
                    for role in ("api", "runner"):
                        used = cpu_after.get(role, 0.0) - cpu_before.get(role, 0.0)
                        result[name][f"{role}_cpu_ms_per_image"] = round(
                            1000 * used / (args.images + 1), 1
                        )
                    if env["INSPECT_RECORDS"] == "on":
                        result[name]["records_written"] = written(url)
                        kept = [p for p in (records / "images").rglob("*") if p.is_file()]
                        result[name]["images_kept"] = len(kept)
            base = result["records off"]["images_per_s"]
            for entry in result.values():
                entry["ratio_to_off"] = round(entry["images_per_s"] / base, 3)
            report["rounds"].append(result)
            print(json.dumps({f"round {round_number + 1}": result}), flush=True)
    for name in CONFIGS:
        ratios = sorted(result[name]["ratio_to_off"] for result in report["rounds"])
        report[f"{name}: median ratio"] = ratios[len(ratios) // 2]
        api_ms = sorted(result[name]["api_cpu_ms_per_image"] for result in report["rounds"])
        report[f"{name}: median API CPU ms per image"] = api_ms[len(api_ms) // 2]
    print("RESULTS " + json.dumps(report))


if __name__ == "__main__":
    main()
