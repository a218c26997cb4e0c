"""Memory, disk and latency under the resource attacks of the security review, measured on
this checkout and on an older commit in one run.

    python -m benchmarks.attack_resources [--baseline 27d0ec0] [--versions 400]

For each checkout (the older one from a `git worktree`), one `bentoml serve` of a tiny
random backbone (what an attack costs does not depend on the backbone's size) with
INSPECT_IMAGES_MAX_MB=100, and, in order:

1. disk: 20 flagged uploads, each a small PNG with 45 MB appended after its end: the kept
   image folder's size against its 100 MB cap;
2. redraws: 40 review heatmaps at once of those records: the API's peak RSS above its RSS
   before; then 30 at once while one client inspects: /inspect latency and the 503s;
3. records in a change: the 20 records reviewed as false alarms and added to the bank in
   one request (a 0.5 kB body): peak RSS of API and runner;
4. calibration: 8 flat grey 6000 x 6000 PNGs (a 1 MB body) as calibration images of a
   change: the answer and the runner's peak RSS; and 4 of them (within this checkout's
   pixel budget) to show what an accepted change costs;
5. versions: `--versions` threshold changes: the product's folder on disk, one /history
   call, and /inspect latency while 4 history calls run.

Prints one table with both checkouts side by side and the ratios; docs/SECURITY.md holds
a run. RSS is sampled every 20 ms (psutil).
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

from benchmarks.heatmap_memory import server_processes, tiny_store
from devtools.local_server import REPO, bentoml_serve, checkout_of

ADMIN_KEY = "attack-benchmark-admin-key"
ADMIN = {"X-API-Key": ADMIN_KEY}
MIB = 1 << 20


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


class PeakRss:
    """Peak RSS above the start, per server process, while the block runs."""

    def __init__(self, url: str) -> None:
        self.processes = server_processes(int(url.rsplit(":", 1)[1]))
        self.peaks: dict[str, float] = {}

    def __enter__(self) -> PeakRss:
        self.start = {role: p.memory_info().rss for role, p in self.processes.items()}
        self.peak = dict(self.start)
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while not self.done.is_set():
            for role, process in self.processes.items():
                self.peak[role] = max(self.peak[role], process.memory_info().rss)
            time.sleep(0.02)

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.thread.join()
        self.peaks = {role: (self.peak[role] - self.start[role]) / MIB for role in self.start}


def timed(call: Callable[[], httpx.Response]) -> tuple[float, int]:
    started = time.perf_counter()
    status = call().status_code
    return time.perf_counter() - started, status


def folder_mib(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / MIB


def disk_mib(path: Path) -> float:
    """Bytes the folder takes on disk, hard links counted once."""
    done = subprocess.run(["du", "-sk", str(path)], capture_output=True, text=True, check=True)
    return int(done.stdout.split()[0]) / 1024


def flagged_part(number: int) -> bytes:
    """A small dark part the carpet bank flags, with 45 MB appended after its end."""
    rng = np.random.default_rng(number)
    pixels = rng.integers(0, 40, (128, 128, 3), dtype=np.uint8)
    return png(pixels) + bytes(45 * MIB)


def run(repo: Path, scratch: Path, versions: int) -> dict[str, Any]:
    home = tiny_store(scratch)  # exported with this checkout's commands (same formats)
    records_dir = scratch / "records"
    figures: dict[str, Any] = {}
    settings = {
        "INSPECT_ADMIN_KEY": ADMIN_KEY,
        "INSPECT_IMAGES_MAX_MB": "100",
        "INSPECT_KEEP_IMAGES": "flagged",
        "INSPECT_RECORDS_DIR": str(records_dir),
        "INSPECT_MAX_QUEUE": "16",
    }
    with bentoml_serve(home, scratch / "serve.log", timeout=300, repo=repo, **settings) as url:
        http = httpx.Client(base_url=url, headers=ADMIN, timeout=600)

        # 1. disk
        ids = []
        for number in range(20):
            files = {"image": ("part.png", flagged_part(number), "image/png")}
            answer = http.post("/inspect", files=files).json()
            ids.append(answer["record_id"])
        time.sleep(3)  # the writer keeps the images off the request path
        flagged = sum(1 for i in ids if http.get(f"/records/{i}").json()["is_anomalous"])
        figures["disk: kept images after 20 stuffed uploads (MiB, cap 100)"] = round(
            folder_mib(records_dir / "images"), 1
        )
        figures["disk: uploads flagged"] = flagged

        # 2. redraws
        with PeakRss(url) as rss, ThreadPoolExecutor(40) as pool:
            statuses = list(
                pool.map(
                    lambda i: http.get(f"/records/{i}/heatmap").status_code,
                    [ids[n % 20] for n in range(40)],
                )
            )
        figures["redraws: 40 at once, API peak RSS (MiB)"] = round(rss.peaks["api"], 1)
        figures["redraws: 40 at once, answered 200 / 503"] = (
            f"{statuses.count(200)} / {statuses.count(503)}"
        )
        image = {"image": ("p.png", png(np.full((128, 128, 3), 128, np.uint8)), "image/png")}
        alone = [timed(lambda: http.post("/inspect", files=image))[0] for _ in range(5)]
        during: list[tuple[float, int]] = []
        with ThreadPoolExecutor(31) as pool:
            redraws = [pool.submit(http.get, f"/records/{ids[n % 20]}/heatmap") for n in range(30)]
            for _ in range(5):
                during.append(timed(lambda: http.post("/inspect", files=image)))
            [r.result() for r in redraws]
        figures["redraws: /inspect median latency alone (s)"] = round(statistics.median(alone), 3)
        figures["redraws: /inspect median latency during 30 redraws (s)"] = round(
            statistics.median(t for t, _ in during), 3
        )
        figures["redraws: /inspect answers 503 during 30 redraws"] = sum(
            status == 503 for _, status in during
        )

        # 3. records in a change
        for record_id in ids:
            http.post(f"/records/{record_id}/review", json={"label": "false_alarm"})
        form = [("records", (None, ",".join(ids))), ("reason", (None, "attack"))]
        with PeakRss(url) as rss:
            answer = http.post("/products/carpet/images", files=form)
        figures["records change: 20 record ids, answer"] = answer.status_code
        figures["records change: API peak RSS (MiB)"] = round(rss.peaks["api"], 1)
        figures["records change: runner peak RSS (MiB)"] = round(rss.peaks["runner"], 1)

        # 4. calibration
        grey = png(np.full((6000, 6000, 3), 128, np.uint8))
        good = png(np.full((128, 128, 3), 120, np.uint8))
        for count in (8, 4):
            files = [("images", ("a.png", good, "image/png"))] + [
                ("calibration_images", (f"c{n}.png", grey, "image/png")) for n in range(count)
            ]
            with PeakRss(url) as rss:
                answer = http.post("/products/carpet/images", files=files)
            figures[f"calibration: {count} x 36 MP, answer"] = answer.status_code
            figures[f"calibration: {count} x 36 MP, runner peak RSS (MiB)"] = round(
                rss.peaks["runner"], 1
            )

        # 5. versions
        product_dir = home / "models" / "bank-carpet"
        before = disk_mib(product_dir)
        started = time.perf_counter()
        for number in range(versions):
            change = {"target": 0.02 + 0.4 * number / versions, "reason": "attack"}
            http.post("/products/carpet/threshold", json=change).raise_for_status()
        figures[f"versions: {versions} threshold changes, seconds each"] = round(
            (time.perf_counter() - started) / versions, 3
        )
        figures[f"versions: {versions} threshold changes, disk growth (MiB)"] = round(
            disk_mib(product_dir) - before, 2
        )
        figures["versions: one /history call (s)"] = round(
            timed(lambda: http.get("/products/carpet/history"))[0], 3
        )
        during = []
        with ThreadPoolExecutor(5) as pool:
            history = [pool.submit(http.get, "/products/carpet/history") for _ in range(4)]
            time.sleep(0.05)
            during.append(timed(lambda: http.post("/inspect", files=image)))
            [h.result() for h in history]
        figures["versions: /inspect latency during 4 /history calls (s)"] = round(during[0][0], 3)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default="27d0ec0", help="the older commit to compare")
    parser.add_argument("--versions", type=int, default=400)
    parser.add_argument("--out", type=Path, help="also write the figures as JSON")
    args = parser.parse_args()
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="attack-") as scratch_dir:
        scratch = Path(scratch_dir)
        with checkout_of(args.baseline, scratch) as old:
            for name, repo in ((args.baseline, old), ("this checkout", REPO)):
                (scratch / name).mkdir()
                results[name] = run(repo, scratch / name, args.versions)
                print(name, json.dumps(results[name], indent=1), flush=True)
    before, after = results[args.baseline], results["this checkout"]
    print(f"\n| figure | {args.baseline} | this checkout | ratio |\n| --- | --- | --- | --- |")
    for key in after:
        ratio = ""  # old / new, for quantities only (not answers or counts)
        measured = "(MiB" in key or "(s)" in key or "seconds" in key
        if measured and isinstance(before.get(key), int | float) and before[key] and after[key]:
            ratio = f"{before[key] / after[key]:.1f}x"
        print(f"| {key} | {before.get(key)} | {after[key]} | {ratio} |")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
