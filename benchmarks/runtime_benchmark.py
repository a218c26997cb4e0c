"""Backbone runtimes on this CPU, measured in one run and interleaved.

    python -m benchmarks.runtime_benchmark [--rounds 5] [--resolutions 224 448] [--batches 1 4]

ViT-S/16-shaped random DINOv3 (the released shape; speed does not depend on the weights).
For each resolution x batch size, every runtime embeds the same batch once per round in turn,
so the shared machine's drift hits them alike; prints the median s/img and the speed-up over
torch. Then, at the largest resolution and batch 1: the predict/backbone overhead ratio per
runtime (a 2,195-row bank, as docs/PERFORMANCE.md), and for each reduced precision the largest
score difference from torch and the image/pixel AUROC on the synthetic set with a bank fitted
by torch (random weights: the AUROC *change* is the figure, not its level). With them, the
self-check `fit precision=int8` runs (detector.quantized) on the test's defect-free images.
`openvino-int8-static` is a product's int8 graph: NNCF, calibrated on the synthetic
product's training images; `...-split-rotation` the same from a graph exported with
transformers' rotation of the patch tokens only (every graph before detector.rope). The
CPU's flags are printed: int8 speed depends on VNNI or AMX.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from detector.anomaly_detector import AnomalyDetector
from detector.commands.random_backbone import make_backbone
from detector.data.mvtec import MVTecCategory, load_mask
from detector.data.synthetic import make_dataset
from detector.dino import DinoBackbone
from detector.fitting import fit_detector
from detector.images import read_image
from detector.int8_check import Int8Check
from detector.memory_bank import BankConfig
from detector.metrics import image_auroc, pixel_auroc
from detector.quantized import Int8Backbone, quantize
from detector.runtimes import GraphBackbone, export_graph
from detector.threads import set_threads, usable_cpus

# (runtime, precision): every combination the project ships.
VARIANTS = [
    ("openvino", "f32"),
    ("onnxruntime", "f32"),
    ("onnxruntime", "int8"),
    ("openvino", "bf16"),
]


def openvino_has_bf16() -> bool:
    import openvino

    return "BF16" in openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def extractors(
    source: Path, resolution: int, threads: int, scratch: Path, calibration: list[Path]
) -> dict[str, object]:
    """Every runtime the project ships, and a product's static int8 graph (NNCF, calibrated
    on `calibration`: the synthetic product's training images, as `fit precision=int8`)."""
    torch_backbone = DinoBackbone(str(source), resolution=resolution, device="cpu")
    graph = export_graph(torch_backbone, scratch / "graphs")
    found = {"torch-f32": torch_backbone}
    for runtime, precision in VARIANTS:
        found[f"{runtime}-{precision}"] = GraphBackbone(graph, runtime, precision, threads)
    prepared = np.stack([torch_backbone.prepare(read_image(path)) for path in calibration])
    stamp = {"spec": torch_backbone.spec.to_dict(), "random_weights": True}
    quantize(graph, prepared, scratch / "int8", stamp)
    found["openvino-int8-static"] = Int8Backbone(scratch / "int8", threads)
    # The same, exported with transformers' rotation of the patches only: the "before".
    split = export_graph(torch_backbone, scratch / "graphs-split", rotate_every_token=False)
    quantize(split, prepared, scratch / "int8-split", stamp)
    found["openvino-int8-static-split-rotation"] = Int8Backbone(scratch / "int8-split", threads)
    return found


def cpu_flags() -> list[str]:
    """The CPU's vector and matrix extensions that decide int8 and bf16 speed."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next(
        (line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")),
        [],
    )
    wanted = (
        "avx2",
        "avx512f",
        "avx512_vnni",
        "avx_vnni",
        "avx512_bf16",
        "amx_tile",
        "amx_int8",
        "amx_bf16",
    )
    return [flag for flag in wanted if flag in flags]


def time_embeddings(extractors_: dict[str, object], batch: int, rounds: int) -> dict[str, float]:
    """Median s/img per extractor, the extractors taking turns in every round."""
    rng = np.random.default_rng(0)
    resolution = extractors_["torch-f32"].spec.resolution
    pixels = rng.standard_normal((batch, 3, resolution, resolution)).astype(np.float32)
    times: dict[str, list[float]] = {name: [] for name in extractors_}
    for extractor in extractors_.values():
        extractor.embed(pixels)  # warm-up: first-call allocations and lazy compilation
    for _ in range(rounds):
        for name, extractor in extractors_.items():
            started = time.perf_counter()
            extractor.embed(pixels)
            times[name].append((time.perf_counter() - started) / batch)
    return {name: float(np.median(values)) for name, values in times.items()}


def overhead_ratios(
    extractors_: dict[str, object], detector: AnomalyDetector, images: list, rounds: int
) -> dict[str, float]:
    """predict time / embed time per runtime, on the same decoded images, interleaved."""
    ratios: dict[str, list[float]] = {name: [] for name in extractors_}
    for _ in range(rounds):
        for name, extractor in extractors_.items():
            scoring = AnomalyDetector(extractor, detector.bank, detector.calibration, batch_size=1)
            prepared = [extractor.prepare(image) for image in images]
            started = time.perf_counter()
            for array in prepared:
                extractor.embed(array[None])
            embed_seconds = time.perf_counter() - started
            started = time.perf_counter()
            scoring.predict(images, with_maps=False)
            ratios[name].append((time.perf_counter() - started) / embed_seconds)
    return {name: round(float(np.median(values)), 3) for name, values in ratios.items()}


def precision_effect(
    extractors_: dict[str, object], detector: AnomalyDetector, dataset: MVTecCategory
) -> dict[str, dict[str, float]]:
    """Largest |score - torch score| and image/pixel AUROC per runtime, same bank."""
    samples = dataset.test_samples()
    labels = np.array([sample.label for sample in samples])
    report, reference, good = {}, None, labels == 0
    for name, extractor in extractors_.items():
        scoring = AnomalyDetector(extractor, detector.bank, detector.calibration)
        results = scoring.predict([sample.path for sample in samples])
        scores = np.array([result.score for result in results])
        if reference is not None:  # the self-check `fit precision=int8` runs, on the test's
            check = Int8Check.measure(  # defect-free images (not in the bank)
                reference[good], scores[good], detector.calibration.threshold, ""
            )
        masks = [load_mask(sample, (64, 64)) for sample in samples]
        maps = [np.asarray(read_map(result.anomaly_map)) for result in results]
        with_mask = [i for i, mask in enumerate(masks) if mask is not None]
        reference = scores if reference is None else reference
        threshold = detector.calibration.threshold
        defective = ~good
        report[name] = {
            **({"self_check": check.summary()} if name != "torch-f32" else {}),
            "max_score_difference": float(np.abs(scores - reference).max()),
            # Where the ranges calibrated on normal images matter: the defects' own patches.
            "max_difference_defect_free": float(np.abs(scores - reference)[good].max()),
            "largest_drop_on_defects": float((reference - scores)[defective].max()),
            "defect_verdicts_agree": float(
                np.mean((scores[defective] > threshold) == (reference[defective] > threshold))
            ),
            "defects_found": float(np.mean(scores[defective] > threshold)),
            "image_auroc": round(image_auroc(labels, scores), 4),
            "pixel_auroc": round(
                pixel_auroc(
                    np.stack([masks[i] for i in with_mask]), np.stack([maps[i] for i in with_mask])
                ),
                4,
            ),
        }
    return report


def read_map(anomaly_map: np.ndarray) -> np.ndarray:
    from PIL import Image

    image = Image.fromarray(anomaly_map.astype(np.float32), mode="F")
    return np.asarray(image.resize((64, 64), Image.Resampling.BILINEAR))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--resolutions", type=int, nargs="+", default=[224, 448])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--threads", type=int, default=usable_cpus())
    args = parser.parse_args()
    set_threads(args.threads)
    results: dict = {
        "threads": args.threads,
        "torch": torch.__version__,
        "openvino_cpu_has_bf16": openvino_has_bf16(),
        "cpu_flags": cpu_flags(),
    }
    with tempfile.TemporaryDirectory() as scratch_name:
        scratch = Path(scratch_name)
        os.environ["DINO_INSPECT_CACHE"] = str(scratch / "cache")
        source = make_backbone(scratch / "vits16", "vits16")
        data = make_dataset(scratch / "data", size=256, n_train=16, n_test_good=8, n_per_defect=4)
        train = sorted((data / "train" / "good").glob("*.png"))
        for resolution in args.resolutions:
            found = extractors(
                source, resolution, args.threads, scratch / str(resolution), train[2:]
            )
            for batch in args.batches:
                seconds = time_embeddings(found, batch, args.rounds)
                torch_seconds = seconds["torch-f32"]
                results[f"{resolution}px_batch{batch}"] = {
                    name: {"s_per_img": round(s, 4), "vs_torch": round(torch_seconds / s, 3)}
                    for name, s in seconds.items()
                }
        detector = fit_detector(
            found["torch-f32"],
            train[2:],
            train[:2],
            bank_config=BankConfig(coreset_size=2195),
            progress=False,
        )
        images = [read_image(path) for path in train[:6]]
        results[f"predict_over_backbone_{resolution}px_batch1"] = overhead_ratios(
            found, detector, images, max(1, args.rounds // 2)
        )
        results["precision_effect_synthetic_carpet"] = precision_effect(
            found, detector, MVTecCategory(scratch / "data", "carpet")
        )
    print("RESULTS " + json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
