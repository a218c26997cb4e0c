"""Soak test: 16 Locust users for 10 minutes against one service; RSS of every service
process at the start and end, and the failure count. Goal: 0 failures, RSS growth < 5 %.

    python -m benchmarks.soak [--minutes 10] [--users 16] [--warmup-minutes 5]
                              [--service-env MALLOC_ARENA_MAX=2 ...]

"Start" is after a warm-up at full concurrency: the first minutes under 16 concurrent
uploads raise allocator high-water marks once, and a leak is growth after that. The API
worker reaches its plateau after about 5 minutes of load (per-process samples, every 30 s,
are printed: docs/PERFORMANCE.md, soak runs 5 and 6). --service-env sets variables for
`bentoml serve` only, e.g. glibc's allocator settings (MALLOC_ARENA_MAX,
MALLOC_MMAP_THRESHOLD_).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import tempfile
import threading
from pathlib import Path

from benchmarks.service_benchmark import benchmark_store, served_throughput, upload_bytes
from devtools.local_server import (
    REPO,
    bentoml_serve,
    locust_command,
    service_env,
    service_rss_mib,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--users", type=int, default=16)
    parser.add_argument("--warmup-minutes", type=float, default=5)
    parser.add_argument("--service-env", nargs="*", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    service_only = dict(item.split("=", 1) for item in args.service_env)
    os.environ.update(BENTOML_DO_NOT_TRACK="True", HF_HUB_OFFLINE="1")
    with tempfile.TemporaryDirectory() as scratch_name:
        scratch = Path(scratch_name)
        model_dir, home = benchmark_store(scratch)
        with bentoml_serve(home, scratch / "serve.log", timeout=300, **service_only) as url:
            served_throughput(url, upload_bytes(4), 4, 24)
            if args.warmup_minutes:
                warmup = locust_command(
                    url,
                    args.users,
                    int(args.warmup_minutes * 60),
                    scratch / "warmup",
                    "--image-size",
                    "512",
                )
                subprocess.run(
                    warmup,
                    cwd=REPO,
                    env=service_env(scratch),
                    check=False,
                    capture_output=True,
                    timeout=args.warmup_minutes * 60 + 300,
                )
            start = service_rss_mib(url)
            prefix = scratch / "soak"
            # RSS of each process every 30 s: a plateau and a leak look alike in two snapshots.
            samples: dict[str, list[float]] = {name: [] for name in start}
            stop_sampling = threading.Event()

            def sample() -> None:
                while not stop_sampling.wait(30):
                    for name, mib in service_rss_mib(url).items():
                        samples.setdefault(name, []).append(mib)

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            subprocess.run(
                locust_command(
                    url, args.users, int(args.minutes * 60), prefix, "--image-size", "512"
                ),
                cwd=REPO,
                env=service_env(scratch),
                check=False,
                capture_output=True,
                timeout=args.minutes * 60 + 300,
            )
            stop_sampling.set()
            sampler.join()
            end = service_rss_mib(url)
        with open(f"{prefix}_stats.csv") as handle:
            total = next(row for row in csv.DictReader(handle) if row["Name"] == "Aggregated")
    growth = {
        name: round((end[name] - start[name]) / start[name] * 100, 2)
        for name in start
        if name in end
    }
    print(
        "RESULTS "
        + json.dumps(
            {
                "minutes": args.minutes,
                "warmup_minutes": args.warmup_minutes,
                "service_env": service_only,
                "users": args.users,
                "requests": int(total["Request Count"]),
                "failures": int(total["Failure Count"]),
                "rss_start_mib": start,
                "rss_end_mib": end,
                "rss_growth_percent": growth,
                "max_growth_percent": max(growth.values(), default=None),
                "rss_every_30s_mib": samples,
            }
        )
    )


if __name__ == "__main__":
    main()
