"""Served throughput vs in-process `predict`, and `bentoml serve` cold start, in one run.

    python -m benchmarks.service_benchmark [--clients 1 4 16] [--requests-per-client 4] [--rounds 3]
        [--runtime torch|openvino|onnxruntime] [--precision f32|bf16|int8]

ViT-S/16-shaped random DINOv3 at 448 px, a 2,195-row bank (1 % of MVTec carpet's patches),
1024 px PNG uploads to /inspect. Prints img/s for each client count and the ratio to the
in-process throughput on the same images (goal >= 0.9 at 16 clients).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from detector.anomaly_detector import AnomalyDetector
from detector.commands.random_backbone import make_backbone
from detector.data.synthetic import carpet_texture, make_dataset
from detector.dino import DinoBackbone
from detector.fitting import fit_detector
from detector.images import decode_image
from detector.memory_bank import BankConfig
from detector.threads import usable_cpus
from devtools.local_server import bentoml_serve, export_models


def build_models(scratch: Path, bank_rows: int) -> Path:
    """Fit a bank with the ViT-S-shaped backbone and save it as a detector folder."""
    backbone_dir = make_backbone(scratch / "vits16", "vits16")
    data = make_dataset(scratch / "data", size=256, n_train=16, n_test_good=1, n_per_defect=0)
    train = sorted((data / "train" / "good").glob("*.png"))
    backbone = DinoBackbone(str(backbone_dir), resolution=448, device="cpu")
    detector = fit_detector(
        backbone,
        train[2:],
        train[:2],
        bank_config=BankConfig(coreset_size=bank_rows),
        progress=False,
    )
    detector.bank.metadata["category"] = "carpet"
    return detector.save(scratch / "model")


def benchmark_store(scratch: Path) -> tuple[Path, Path]:
    """Fit the benchmark bank (1 % of MVTec carpet's patches) and export it: (model, home)."""
    model_dir = build_models(scratch, bank_rows=2195)
    home = scratch / "bentoml_home"
    exported = export_models(model_dir, home)
    assert exported.returncode == 0, exported.stderr
    return model_dir, home


def upload_bytes(count: int, size: int = 1024, seed: int = 5) -> list[bytes]:
    """`count` synthetic carpet PNGs of `size` px, the same for the same seed."""
    rng = np.random.default_rng(seed)
    uploads = []
    for _ in range(count):
        buffer = io.BytesIO()
        Image.fromarray((carpet_texture(size, rng) * 255).astype(np.uint8)).save(buffer, "PNG")
        uploads.append(buffer.getvalue())
    return uploads


def served_throughput(
    url: str, uploads: list[bytes], clients: int, total: int
) -> tuple[float, float]:
    """(img/s, share of the machine's CPU the client threads used themselves).

    The threads share one keep-alive connection pool, as a camera station would: a fresh
    connection per request made the load generator itself take CPU from the service.
    """
    with httpx.Client(timeout=600, limits=httpx.Limits(max_connections=clients)) as client:

        def one(index: int) -> None:
            files = {"image": ("x.png", uploads[index % len(uploads)], "image/png")}
            client.post(f"{url}/inspect", files=files).raise_for_status()

        one(0)  # warm the path
        started, client_cpu = time.perf_counter(), time.process_time()
        with ThreadPoolExecutor(max_workers=clients) as pool:
            list(pool.map(one, range(total)))
        seconds = time.perf_counter() - started
    # The clients share the server's cores here: their CPU time is taken from the service.
    client_share = (time.process_time() - client_cpu) / (seconds * usable_cpus())
    return total / seconds, client_share


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests-per-client", type=int, default=4)
    parser.add_argument("--min-requests", type=int, default=16)
    parser.add_argument("--warmup-requests", type=int, default=24)
    parser.add_argument("--baseline-images", type=int, default=12)
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="served runs per client count, each between two in-process baselines",
    )
    parser.add_argument("--runtime", default="torch", help="backbone runtime, both sides")
    parser.add_argument("--precision", default="f32")
    parser.add_argument(
        "--service-env",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="environment for `bentoml serve` only (the in-process baseline keeps defaults)",
    )
    args = parser.parse_args()
    service_only = dict(item.split("=", 1) for item in args.service_env)
    service_only.update(INSPECT_RUNTIME=args.runtime, INSPECT_PRECISION=args.precision)
    os.environ.update(BENTOML_DO_NOT_TRACK="True", HF_HUB_OFFLINE="1")
    results: dict = {
        "settings": {k: v for k, v in os.environ.items() if k.startswith("INSPECT_")},
        "service_only_env": service_only,
    }
    with tempfile.TemporaryDirectory() as scratch_name:
        scratch = Path(scratch_name)
        model_dir, home = benchmark_store(scratch)
        uploads = upload_bytes(8)

        # In-process baseline on the same uploads: decode (as the service must) + predict,
        # one image at a time, with the server idle. This shared machine's speed drifts over
        # minutes (a single short baseline swung the ratio by +-15 %), so the served runs
        # are interleaved with baselines: round r is compared with the baselines measured
        # just before and just after it.
        detector = AnomalyDetector.load(
            model_dir, device="cpu", batch_size=1, runtime=args.runtime, precision=args.precision
        )
        detector.predict([decode_image(uploads[0])], with_maps=False)

        def baseline() -> float:
            started = time.perf_counter()
            for index in range(args.baseline_images):
                detector.predict([decode_image(uploads[index % len(uploads)])], with_maps=False)
            return args.baseline_images / (time.perf_counter() - started)

        started = time.perf_counter()
        log_path = Path(tempfile.gettempdir()) / "service_benchmark_serve.log"
        with bentoml_serve(home, log_path, timeout=300, **service_only) as url:
            results["cold_start_to_ready_s"] = round(time.perf_counter() - started, 1)
            # BentoML's batcher calibrates on its first ~12 requests (it waits for batches of
            # 2 and 3 to time them); measure the steady state after that, as production runs.
            served_throughput(url, uploads, 4, args.warmup_requests)
            baselines = [baseline()]
            runs: dict[int, list[tuple[int, float, float]]] = {c: [] for c in args.clients}
            for _ in range(args.rounds):
                for clients in args.clients:
                    total = max(args.min_requests, clients * args.requests_per_client)
                    runs[clients].append((total, *served_throughput(url, uploads, clients, total)))
                baselines.append(baseline())
            metrics = httpx.get(f"{url}/metrics", timeout=30).text
        in_process = float(np.mean(baselines))
        results["in_process_img_per_s"] = {
            "each": [round(b, 3) for b in baselines],
            "mean": round(in_process, 3),
        }
        for clients, rounds in runs.items():
            round_ratios = [
                rate / ((baselines[r] + baselines[r + 1]) / 2)
                for r, (_, rate, _) in enumerate(rounds)
            ]
            images = sum(total for total, _, _ in rounds)
            seconds = sum(total / rate for total, rate, _ in rounds)
            results[f"served_{clients}_clients"] = {
                "requests": images,
                "img_per_s": round(images / seconds, 3),
                "ratio_to_in_process": round(float(np.mean(round_ratios)), 3),
                "ratio_each_round": [round(ratio, 3) for ratio in round_ratios],
                "client_cpu_share_of_machine": round(
                    float(np.mean([share for _, _, share in rounds])), 3
                ),
            }
        batch_lines = [
            line
            for line in metrics.splitlines()
            if line.startswith("bentoml_service_adaptive_batch_size_")
            and 'method_name="score"' in line
            and ("_sum" in line or "_count" in line)
        ]
        values = {line.split("{")[0]: float(line.rsplit(" ", 1)[1]) for line in batch_lines}
        count = values.get("bentoml_service_adaptive_batch_size_count", 0)
        if count:
            mean = values["bentoml_service_adaptive_batch_size_sum"] / count
            results["mean_adaptive_batch_size"] = round(mean, 2)
    print("RESULTS " + json.dumps(results))


if __name__ == "__main__":
    main()
