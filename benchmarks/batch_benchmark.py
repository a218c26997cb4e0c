"""Batch-job throughput vs in-process `predict` on the same images, in one run.

    python -m benchmarks.batch_benchmark [--images 200]

ViT-S/16-shaped random DINOv3 at 448 px; 512 px PNGs on disk. `predict` reads, decodes and
scores the files in batches of 8 in one thread; the batch job does the same work with its
prefetching loader, journal and CSV. The job's own rate (printed in its summary) excludes
process start-up and model loading; the wall-clock ratio including them is printed too.
Goal: job / predict >= 0.95.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks.service_benchmark import benchmark_store
from detector.anomaly_detector import AnomalyDetector
from detector.data.synthetic import carpet_texture
from devtools.local_server import REPO, service_env


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    args = parser.parse_args()
    os.environ.update(BENTOML_DO_NOT_TRACK="True", HF_HUB_OFFLINE="1")
    with tempfile.TemporaryDirectory() as scratch_name:
        scratch = Path(scratch_name)
        model_dir, home = benchmark_store(scratch)
        folder = scratch / "incoming"
        rng = np.random.default_rng(3)
        for index in range(args.images):
            target = folder / f"line{index % 4}" / f"{index:05d}.png"
            target.parent.mkdir(parents=True, exist_ok=True)
            image = Image.fromarray((carpet_texture(512, rng) * 255).astype(np.uint8))
            image.save(target, compress_level=1)
        paths = sorted(folder.rglob("*.png"))

        detector = AnomalyDetector.load(model_dir, device="cpu", batch_size=8)
        detector.predict(paths[:8], with_maps=False)
        started = time.perf_counter()
        detector.predict(paths, with_maps=False)
        predict_rate = len(paths) / (time.perf_counter() - started)
        del detector

        started = time.perf_counter()
        subprocess.run(
            [
                sys.executable,
                "-m",
                "batch",
                str(folder),
                "--out",
                str(scratch / "out"),
                "--batch-size",
                "8",
                "--no-progress",
            ],
            cwd=REPO,
            env=service_env(home),
            check=True,
            capture_output=True,
        )
        wall = time.perf_counter() - started
        summary = json.loads((scratch / "out" / "summary.json").read_text())
    results = {
        "images": len(paths),
        "predict_img_per_s": round(predict_rate, 3),
        "batch_job_img_per_s": summary["images_per_second"],
        "ratio_job_over_predict": round(summary["images_per_second"] / predict_rate, 3),
        "batch_job_wall_s_incl_startup": round(wall, 1),
        "ratio_incl_startup": round(len(paths) / wall / predict_rate, 3),
    }
    print("RESULTS " + json.dumps(results))


if __name__ == "__main__":
    main()
