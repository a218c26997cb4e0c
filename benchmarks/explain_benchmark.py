"""What explaining a flag costs: served /inspect with explain=true against without, in one run,
and the bytes a bank version keeps for it.

    python -m benchmarks.explain_benchmark [--images 8] [--rounds 4]

ViT-S/16-shaped random DINOv3 at 448 px, a 2,195-row bank (1 % of MVTec carpet's patches,
service_benchmark.py), 1024 px PNG uploads, one client. Rounds alternate which mode goes
first, so drift in the machine's speed hits both alike. Prints s/img for each mode and the
ratio explain / plain per round and over all rounds (goal <= 1.10), the explanation's own
time in-process next to scoring's, and the bytes of provenance.npz and crops.npz against
the index's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

from benchmarks.service_benchmark import benchmark_store, upload_bytes
from detector.anomaly_detector import AnomalyDetector
from detector.images import decode_image
from detector.memory_bank import INDEX_FILE
from detector.provenance import CROPS_FILE, PROVENANCE_FILE
from devtools.local_server import bentoml_serve

KEY = "explain-benchmark-key"  # an explanation is a reviewer's to see


def served_seconds(url: str, uploads: list[bytes], explain: bool) -> float:
    """Seconds per image for `uploads` sent one after another."""
    fields = {"explain": "true"} if explain else {}
    with httpx.Client(timeout=600, headers={"X-API-Key": KEY}) as client:
        started = time.perf_counter()
        for data in uploads:
            files = {"image": ("x.png", data, "image/png")}
            answer = client.post(f"{url}/inspect", files=files, data=fields)
            answer.raise_for_status()
            assert ("explanation" in answer.json()) == explain
        return (time.perf_counter() - started) / len(uploads)


def in_process(model_dir: Path, uploads: list[bytes]) -> dict[str, float]:
    """Milliseconds per image of scoring and of the explanation, in this process."""
    detector = AnomalyDetector.load(model_dir, device="cpu")
    score_s = explain_s = 0.0
    for data in uploads:
        image = decode_image(data)
        prepared = detector.extractor.prepare(image)
        started = time.perf_counter()
        (result,) = detector.predict_prepared(prepared[None], [image.size], with_maps=False)
        scored = time.perf_counter()
        detector.explain(result, prepared)
        explain_s += time.perf_counter() - scored
        score_s += scored - started
    count = len(uploads)
    return {"score_ms": 1000 * score_s / count, "explain_ms": 1000 * explain_s / count}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    os.environ.update(BENTOML_DO_NOT_TRACK="True", HF_HUB_OFFLINE="1")
    with tempfile.TemporaryDirectory() as scratch_name:
        scratch = Path(scratch_name)
        model_dir, home = benchmark_store(scratch)
        uploads = upload_bytes(args.images)
        rounds = []
        with bentoml_serve(
            home, scratch / "serve.log", timeout=300, INSPECT_API_KEYS=f"bench=reviewer:{KEY}"
        ) as url:
            served_seconds(url, uploads[:2], explain=True)  # warm both paths
            for number in range(args.rounds):
                order = (False, True) if number % 2 == 0 else (True, False)
                seconds = {mode: served_seconds(url, uploads, mode) for mode in order}
                rounds.append({"plain_s": seconds[False], "explain_s": seconds[True]})
        local = in_process(model_dir, uploads)
        stored = next((home / "models").rglob(PROVENANCE_FILE))
        with np.load(stored) as provenance, np.load(stored.parent / CROPS_FILE) as kept:
            crops, sources = kept["crops"], provenance["sources"]
        file_bytes = {
            "provenance_file_bytes": stored.stat().st_size
            + (stored.parent / CROPS_FILE).stat().st_size,
            "index_file_bytes": (stored.parent / INDEX_FILE).stat().st_size,
        }
    for row in rounds:
        row["ratio"] = row["explain_s"] / row["plain_s"]
    report = {
        "rounds": rounds,
        "ratio_all_rounds": sum(r["explain_s"] for r in rounds) / sum(r["plain_s"] for r in rounds),
        "ratio_median": statistics.median(r["ratio"] for r in rounds),
        "in_process": local,
        "bank_rows": int(sources.shape[0]),
        "crops": int(crops.shape[0]),
        "crop_pixel_bytes": int(crops.nbytes),
        **file_bytes,
    }
    print(json.dumps(report, indent=2))
    for number, row in enumerate(rounds):
        print(
            f"round {number}: plain {row['plain_s']:.3f} s/img, explain "
            f"{row['explain_s']:.3f} s/img, ratio {row['ratio']:.3f}"
        )
    print(
        f"explain / plain over all rounds: {report['ratio_all_rounds']:.3f} (goal <= 1.10); "
        f"explanation {local['explain_ms']:.2f} ms next to scoring {local['score_ms']:.0f} ms "
        f"in-process; provenance and crops {report['provenance_file_bytes'] / 2**20:.2f} MiB for "
        f"{report['bank_rows']} rows ({report['crop_pixel_bytes'] / 2**20:.2f} MiB of crop "
        f"pixels), index {report['index_file_bytes'] / 2**20:.2f} MiB"
    )


if __name__ == "__main__":
    main()
