"""Peak memory of one /heatmap request for a 40 MP image, per server process.

    python -m benchmarks.heatmap_memory [--megapixels 40] [--outputs overlay npy]

Serves a tiny random backbone (the backbone's size does not change what a heatmap costs),
then posts one 40 MP JPEG and one 40 MP PNG to /heatmap for each output, sampling the RSS of
the API and runner processes every 20 ms. Prints, per request, each process's peak RSS above
its RSS just before the request. It finds the server's processes by its port, and runs on
checkouts from this commit's layout on (devtools/, detector.fitting).
"""

from __future__ import annotations

import argparse
import io
import json
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import psutil
from PIL import Image

from detector.commands.random_backbone import make_backbone
from detector.data.synthetic import make_dataset
from detector.dino import DinoBackbone
from detector.fitting import fit_detector
from detector.memory_bank import BankConfig
from devtools.local_server import bentoml_serve, export_models


def server_processes(port: int) -> dict[str, psutil.Process]:
    """The API and runner worker processes of the `bentoml serve` listening on `port`."""
    roots = [
        process
        for process in psutil.process_iter(["cmdline"])
        if f"--port {port}" in " ".join(process.info["cmdline"] or [])
    ]
    found = {}
    for process in (child for root in roots for child in root.children(recursive=True)):
        command = " ".join(process.cmdline())
        for role in ("api", "runner"):
            if f"--service-name inspection_{role}" in command:
                found[role] = process
    return found


def tiny_store(scratch: Path) -> Path:
    """A BentoML home with a tiny random backbone and a bank fitted on the synthetic set."""
    source = make_backbone(scratch / "tiny", "tiny")
    data = make_dataset(scratch / "data", size=128, n_train=8, n_test_good=1, n_per_defect=0)
    train = sorted((data / "train" / "good").glob("*.png"))
    backbone = DinoBackbone(str(source), resolution=128, device="cpu")
    detector = fit_detector(
        backbone, train[2:], train[:2], bank_config=BankConfig(coreset_ratio=0.25)
    )
    detector.bank.metadata["category"] = "carpet"
    home = scratch / "home"
    assert export_models(detector.save(scratch / "model"), home).returncode == 0
    return home


def big_image(megapixels: float, fmt: str) -> bytes:
    width = int((megapixels * 1e6 * 4 / 3) ** 0.5)
    height = int(megapixels * 1e6 / width)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    pattern = 127 + 60 * np.sin(x / 37.0) * np.cos(y / 53.0)
    gray = pattern.astype(np.uint8)
    image = Image.merge("RGB", [Image.fromarray(gray)] * 3)
    buffer = io.BytesIO()
    image.save(buffer, fmt, **({"quality": 90} if fmt == "JPEG" else {"compress_level": 1}))
    return buffer.getvalue()


def peak_during(processes: dict[str, psutil.Process], request) -> tuple[dict[str, float], int]:
    """(peak RSS above the starting RSS in MiB per role, HTTP status) of one request."""
    start = {role: process.memory_info().rss for role, process in processes.items()}
    peaks = dict(start)
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            for role, process in processes.items():
                peaks[role] = max(peaks[role], process.memory_info().rss)
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        status = request()
    finally:
        done.set()
        sampler.join()
    return {role: round((peaks[role] - start[role]) / 2**20, 1) for role in start}, status


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megapixels", type=float, default=39.9)
    parser.add_argument("--outputs", nargs="+", default=["overlay", "npy"])
    args = parser.parse_args()
    results: dict = {"megapixels": args.megapixels}
    with tempfile.TemporaryDirectory() as scratch_name:
        scratch = Path(scratch_name)
        home = tiny_store(scratch)
        uploads = {fmt: big_image(args.megapixels, fmt) for fmt in ("JPEG", "PNG")}
        results["upload_mb"] = {fmt: round(len(data) / 1e6, 1) for fmt, data in uploads.items()}
        for fmt, data in uploads.items():
            for output in args.outputs:
                # A fresh server per case: memory freed by one request stays in the process
                # and would flatter the next.
                with bentoml_serve(home, scratch / "serve.log", timeout=300) as url:
                    processes = server_processes(int(url.rsplit(":", 1)[1]))

                    def request(url=url, data=data, output=output) -> int:
                        files = {"image": ("big", data, "application/octet-stream")}
                        response = httpx.post(
                            f"{url}/heatmap", files=files, data={"output": output}, timeout=600
                        )
                        return response.status_code

                    peaks, status = peak_during(processes, request)
                results[f"{fmt} {output}"] = {"status": status, "peak_above_idle_mib": peaks}
    print("RESULTS " + json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
