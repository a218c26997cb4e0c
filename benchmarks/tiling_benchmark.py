"""Small defects on large frames: the frame resized to the input, or tiles at scale 1.0 and 0.5.

    python -m benchmarks.tiling_benchmark [--frame 1024] [--resolution 224] [--rss-frame]

The synthetic high-resolution set (detector/data/highres.py: native-scale weave, 6-20 px
spots and scratches), a ViT-S/16-shaped random DINOv3, and for each mode one fit
(cross-fitted threshold at 1 %) and one pass over the test split. Prints image and pixel
AUROC, the share of defective frames found (at the calibrated 1 % threshold, and above
every defect-free test frame), s/image and s/MP, and the time per MP against the
backbone's own time for the same inputs (goal: within 1.2x). With `--rss-frame`, the peak
RSS of one 20 MP frame (5472 x 3648) inspected in tiles at scale 1.0, in a process of its
own. Random weights: the figures compare modes, not what real DINOv3 features would find.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
from PIL import Image

from detector.anomaly_detector import AnomalyDetector
from detector.commands.random_backbone import make_backbone
from detector.data.highres import make_highres_dataset
from detector.data.mvtec import MVTecCategory
from detector.dino import DinoBackbone
from detector.fitting import fit_detector
from detector.memory_bank import BankConfig
from detector.metrics import image_auroc, pixel_auroc
from detector.tiling import TILE_BATCH, TiledExtractor, Tiling
from devtools.local_server import REPO

MODES = {"resize": None, "tiles, scale 1.0": 1.0, "tiles, scale 0.5": 0.5}
RSS_FRAME = (5472, 3648)  # 20 MP


def extractor_for(backbone: DinoBackbone, scale: float | None, frame: int):
    if scale is None:
        return backbone
    tiling = Tiling(True, backbone.resolution, 0.25, scale).for_frame((frame, frame))
    return TiledExtractor(backbone, tiling)


def backbone_seconds_per_input(backbone: DinoBackbone, batch: int, rounds: int = 3) -> float:
    """The backbone alone, on random inputs in batches as the mode sends them."""
    rng = np.random.default_rng(0)
    inputs = rng.normal(size=(batch, 3, backbone.resolution, backbone.resolution))
    inputs = inputs.astype(np.float32)
    backbone.embed(inputs)
    started = time.perf_counter()
    for _ in range(rounds):
        backbone.embed(inputs)
    return (time.perf_counter() - started) / (rounds * batch)


def run_mode(backbone: DinoBackbone, scale: float | None, data: MVTecCategory, frame: int):
    extractor = extractor_for(backbone, scale, frame)
    detector = fit_detector(
        extractor,
        data.train_paths(),
        bank_config=BankConfig(coreset_ratio=0.1, seed=0),
        batch_size=1,
        progress=False,
    )
    samples = data.test_samples()
    started = time.perf_counter()
    results = detector.predict([s.path for s in samples])
    seconds = (time.perf_counter() - started) / len(samples)
    labels = np.array([s.label for s in samples])
    scores = np.array([r.score for r in results])
    flagged = np.array([r.is_anomalous for r in results])
    defective = labels == 1
    size = 256  # maps and masks compared at this square size, as `evaluate` does
    maps = np.stack(
        [np.asarray(Image.fromarray(r.anomaly_map).resize((size, size))) for r in results]
    )
    masks = np.stack([mask_of(s, size) for s in samples])
    inputs = extractor.layout.tiles if isinstance(extractor, TiledExtractor) else 1
    return {
        "image_auroc": image_auroc(labels, scores),
        "pixel_auroc": pixel_auroc(masks, maps),
        "found_at_calibrated_1pct": float(flagged[defective].mean()),
        "found_above_every_good": float(np.mean(scores[defective] > scores[~defective].max())),
        "good_flagged": float(flagged[~defective].mean()),
        "backbone_inputs_per_image": inputs,
        "s_per_image": seconds,
        "s_per_mp": seconds / (frame * frame / 1e6),
    }


def mask_of(sample, size: int) -> np.ndarray:
    if sample.mask_path is None:
        return np.zeros((size, size), bool)
    with Image.open(sample.mask_path) as mask:
        return np.asarray(mask.convert("L").resize((size, size))) > 127


def inspect_one_large_frame(backbone_dir: Path, resolution: int) -> dict:
    """Peak RSS of this process before and after it inspects one 20 MP frame in tiles at
    scale 1.0 (a bank fitted on small crops, then told the large frame's tiling)."""
    backbone = DinoBackbone(str(backbone_dir), resolution=resolution, device="cpu")
    rng = np.random.default_rng(0)
    frame = Image.fromarray(rng.integers(0, 255, (RSS_FRAME[1], RSS_FRAME[0], 3), np.uint8))
    crop = (2 * resolution, 2 * resolution)
    small = TiledExtractor(backbone, Tiling(True, resolution, 0.25, 1.0, crop))
    train = [frame.crop((0, 0, *crop)) for _ in range(5)]
    detector = fit_detector(small, train, progress=False, batch_size=1)
    detector.bank.metadata["tiling"] = Tiling(True, resolution, 0.25, 1.0, RSS_FRAME).to_dict()
    large = AnomalyDetector(backbone, detector.bank, detector.calibration, detector.scoring, 1)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    started = time.perf_counter()
    tracemalloc.start()  # numpy's buffers are traced: what the frame itself allocates
    large.predict([frame], with_maps=True)
    _, frame_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "tiles": large.extractor.layout.tiles,
        "grid": list(large.extractor.layout.grid),
        "seconds": round(time.perf_counter() - started, 1),
        "allocated_peak_mib_during_frame": round(frame_peak / 2**20),
        "peak_rss_mib_before_frame": round(before),
        "peak_rss_mib_after_frame": round(after),
    }


def rss_of_one_frame(backbone_dir: Path, resolution: int) -> dict:
    """`inspect_one_large_frame` in a process of its own (peak RSS never goes down)."""
    command = [sys.executable, "-m", "benchmarks.tiling_benchmark", "--rss-child"]
    command += [str(backbone_dir), "--resolution", str(resolution)]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frame", type=int, default=1024, help="frame side in px")
    parser.add_argument("--resolution", type=int, default=224, help="backbone input px")
    parser.add_argument("--train", type=int, default=10)
    parser.add_argument("--test-good", type=int, default=10)
    parser.add_argument("--per-defect", type=int, default=5)
    parser.add_argument("--rss-frame", action="store_true", help="also one 20 MP frame")
    parser.add_argument("--rss-child", type=Path, help=argparse.SUPPRESS)  # a backbone folder
    args = parser.parse_args()
    if args.rss_child:
        print(json.dumps(inspect_one_large_frame(args.rss_child, args.resolution)))
        return
    with tempfile.TemporaryDirectory(prefix="tiling-") as scratch_name:
        scratch = Path(scratch_name)
        backbone_dir = make_backbone(scratch / "vits16", "vits16")
        backbone = DinoBackbone(str(backbone_dir), resolution=args.resolution, device="cpu")
        root = make_highres_dataset(
            scratch,
            size=args.frame,
            n_train=args.train,
            n_test_good=args.test_good,
            n_per_defect=args.per_defect,
        )
        data = MVTecCategory(root.parent, root.name)
        figures = {}
        for name, scale in MODES.items():
            batch = 1 if scale is None else TILE_BATCH  # as the mode runs the backbone
            before = backbone_seconds_per_input(backbone, batch)
            figures[name] = run_mode(backbone, scale, data, args.frame)
            per_input = (before + backbone_seconds_per_input(backbone, batch)) / 2
            inputs = figures[name]["backbone_inputs_per_image"]
            figures[name]["backbone_s_per_input"] = per_input
            figures[name]["vs_backbone_alone"] = figures[name]["s_per_image"] / (inputs * per_input)
            print(name, json.dumps(figures[name]), flush=True)
        if args.rss_frame:
            figures["20 MP frame, tiles at scale 1.0"] = rss_of_one_frame(
                backbone_dir, args.resolution
            )
            print(json.dumps(figures["20 MP frame, tiles at scale 1.0"]), flush=True)
    print(f"\n{args.frame}-px frames, ViT-S/16 random weights at {args.resolution} px")
    print(
        "| mode | image AUROC | pixel AUROC | defects found (calibrated 1 %) | found above "
        "every good frame | good frames flagged | inputs/image | s/image | s/MP | "
        "÷ backbone alone |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name in MODES:
        f = figures[name]
        print(
            f"| {name} | {f['image_auroc']:.3f} | {f['pixel_auroc']:.3f} | "
            f"{f['found_at_calibrated_1pct']:.0%} | {f['found_above_every_good']:.0%} | "
            f"{f['good_flagged']:.0%} | {f['backbone_inputs_per_image']} | "
            f"{f['s_per_image']:.2f} | {f['s_per_mp']:.2f} | {f['vs_backbone_alone']:.2f} |"
        )
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\npeak RSS of this process: {peak:.0f} MiB")


if __name__ == "__main__":
    main()
