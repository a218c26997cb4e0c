"""Coreset quality and speed on real patch features: the fit's coreset against plain greedy.

    python -m benchmarks.coreset_benchmark [--rows 200000] [--ratio 0.01]

Features: a random-weight DINOv3 ViT-S/16 (the released model's shape) over the synthetic
carpet set at 448 px, 784 patches per image, cached under the dino-inspect cache folder so
a rerun measures the coreset only. Plain greedy k-center runs over every row with the same
projection; both covering radii are measured the same way, as the largest cosine distance
from any row to its nearest kept row (the distance scoring uses). Prints the ratios of one
run: radius (ours / plain) and time (plain / ours). Also the selection the fit used before,
each chunk keeping its own share of centres, for comparison; `--exact-plain` adds plain
greedy without the projection (about 3 times slower than with it).

    python -m benchmarks.coreset_benchmark --ratio 0.1 --exact-plain   # 20,000 centres
    python -m benchmarks.coreset_benchmark --million 1000000 --ratio 0.01  # memory
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from detector.coreset import (
    DEFAULT_PROJECTION_DIM,
    chunk_share_indices,
    coreset_size,
    streaming_coreset,
)
from detector.greedy import covering_radius, greedy_k_center, random_projection
from detector.memory_bank import l2_normalize
from detector.runtimes import cache_dir


def carpet_features(rows: int, seed: int = 0) -> np.ndarray:
    """(rows, 384) L2-normalised patch features of synthetic carpet images, cached."""
    cache = cache_dir() / "benchmarks" / f"carpet-vits16-448-{rows}-{seed}.npy"
    if cache.exists():
        return np.load(cache)
    from detector.anomaly_detector import iter_features
    from detector.backbone import build_extractor
    from detector.commands.random_backbone import make_backbone
    from detector.data.synthetic import make_dataset

    work = cache.parent / "carpet-work"
    images_needed = -(-rows // 784)
    root = make_dataset(
        work / "data", n_train=images_needed, n_test_good=1, n_per_defect=1, size=448, seed=seed
    )
    train = sorted((Path(root) / "train" / "good").glob("*.png"))[:images_needed]
    backbone = make_backbone(work / "vits16", "vits16", seed)
    extractor = build_extractor(str(backbone), resolution=448)
    blocks = iter_features(extractor, train, 4, progress=True)
    features = l2_normalize(np.concatenate([block.reshape(-1, 384) for block in blocks]))[:rows]
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.save(cache, features)
    return features


def timed(function, *args, **kwargs):
    started = time.perf_counter()
    value = function(*args, **kwargs)
    return value, time.perf_counter() - started


def anonymous_peak(function, *args, **kwargs):
    """(value, seconds, peak anonymous RSS in MiB while it ran): the process's own memory,
    not the page cache's pages of the spill file it maps (RssFile)."""
    import threading

    def anonymous_mib() -> float:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
        return 0.0

    peak, running = [anonymous_mib()], [True]

    def sample() -> None:
        while running[0]:
            peak.append(anonymous_mib())
            time.sleep(0.05)

    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    try:
        value, seconds = timed(function, *args, **kwargs)
    finally:
        running[0] = False
        watcher.join()
    return value, seconds, max(peak) - peak[0]


def million_rows(rows: int, ratio: float) -> dict:
    """A 1 % coreset of `rows` x 384 streamed rows (clustered unit vectors made chunk by chunk,
    so the input itself never sits in memory whole), with its peak anonymous memory."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(2000, 384)).astype(np.float32)

    def chunks():
        for start in range(0, rows, 16384):
            part = np.random.default_rng(start)
            size = min(16384, rows - start)
            block = centres[part.integers(0, len(centres), size)]
            yield l2_normalize(block + 0.3 * part.normal(size=block.shape).astype(np.float32))

    keep = coreset_size(rows, ratio)
    coreset, seconds, peak_mib = anonymous_peak(
        streaming_coreset, chunks(), rows, keep, progress=False
    )
    return {
        "rows": f"{rows} x 384 (clustered random unit vectors, streamed)",
        "kept_rows": keep,
        "seconds": round(seconds, 1),
        "peak_anonymous_mib_over_start": round(peak_mib),
        "input_mib": round(rows * 384 * 4 / 2**20),
        "recorded_radius": round(coreset.radius, 5),
    }


def shares(chunks: list[np.ndarray], rows: int, keep: int, tried: list[float]) -> dict:
    """Seconds and covering radius of the fit's coreset with other shares of the centres
    taken from the chunks before the global pass (above the global limit)."""
    import detector.coreset as coreset

    found = {}
    for share in tried:
        coreset.CHUNKED_SHARE = share
        kept, seconds = timed(streaming_coreset, chunks, rows, keep, progress=False)
        found[str(share)] = {"seconds": round(seconds, 1), "radius": round(kept.radius, 5)}
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--ratio", type=float, default=0.01)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--exact-plain", action="store_true")
    parser.add_argument(
        "--million", type=int, default=0, help="only the memory run: this many streamed rows"
    )
    parser.add_argument(
        "--shares",
        type=float,
        nargs="*",
        help="only the fit's coreset, with these shares of the centres from the chunks",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.million:
        print(json.dumps(million_rows(args.million, args.ratio), indent=2))
        return
    features = carpet_features(args.rows)
    keep = coreset_size(len(features), args.ratio)
    chunks = [features[start : start + 16384] for start in range(0, len(features), 16384)]
    if args.shares:
        print(json.dumps(shares(chunks, len(features), keep, args.shares), indent=2))
        return

    ours, ours_s = timed(streaming_coreset, chunks, len(features), keep, progress=False)
    projection = random_projection(features.shape[1], DEFAULT_PROJECTION_DIM, 0)
    chunk_only, chunk_only_s = timed(chunk_share_indices, features, keep, 0, 16384, projection)
    plain, plain_s = timed(greedy_k_center, features, keep, projection=projection)

    radius = {
        "ours": covering_radius(features, ours.rows),
        "chunk_only": covering_radius(features, features[chunk_only]),
        "plain_greedy": covering_radius(features, features[plain]),
    }
    seconds = {"ours": ours_s, "chunk_only": chunk_only_s, "plain_greedy": plain_s}
    if args.exact_plain:
        exact, seconds["plain_greedy_exact"] = timed(greedy_k_center, features, keep)
        radius["plain_greedy_exact"] = covering_radius(features, features[exact])
    exact_ratios = {}
    if args.exact_plain:
        exact_ratios = {
            "radius_ours_over_plain_exact": round(radius["ours"] / radius["plain_greedy_exact"], 4),
            "plain_exact_over_ours_time": round(seconds["plain_greedy_exact"] / ours_s, 1),
        }
    report = {
        "features": f"{len(features)} x {features.shape[1]} (random ViT-S/16, 448 px, carpet)",
        "chunks": len(chunks),
        "kept_rows": keep,
        "radius_cosine": {name: round(value, 5) for name, value in radius.items()},
        "radius_ours_over_plain": round(radius["ours"] / radius["plain_greedy"], 4),
        "radius_chunk_only_over_plain": round(radius["chunk_only"] / radius["plain_greedy"], 4),
        "recorded_radius_over_measured": round(ours.radius / radius["ours"], 4),
        "seconds": {name: round(value, 2) for name, value in seconds.items()},
        "plain_over_ours_time": round(plain_s / ours_s, 1),
        **exact_ratios,
        "threads": torch.get_num_threads(),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
