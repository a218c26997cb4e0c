"""The drift statistic's cost per scored image: what the service pays on every request.

    python -m benchmarks.drift_benchmark [--reference 6 20 200] [--window 20 100 200]

The runner updates each product's drift window and recomputes the statistic for every
image it scores. Only the KS distance is used, never its p-value; scipy's default computes
an exact p-value for samples under 10,000 values, which cost as much as scoring a small
image. Times `drift_statistic` (asymptotic p-value) against scipy's default on the same
profiles, interleaved in one run, and prints the ratio and the largest difference between
the two distances (only rounding: the distance does not depend on the p-value method).
"""

from __future__ import annotations

import argparse
import time
from functools import partial

import numpy as np
from scipy.stats import ks_2samp

from detector.drift import PROFILE_QUANTILES, drift_statistic


def seconds(call, rounds: int) -> float:
    started = time.perf_counter()
    for _ in range(rounds):
        call()
    return (time.perf_counter() - started) / rounds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reference", type=int, nargs="+", default=[6, 20, 200])
    parser.add_argument("--window", type=int, nargs="+", default=[20, 100, 200])
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    size = PROFILE_QUANTILES.size
    print("reference  window  default ms  used ms  default/used  largest difference")
    for images in args.reference:
        reference = rng.gamma(2.0, 0.1, (images, size)).astype(np.float32)
        for window in args.window:
            recent = rng.gamma(2.0, 0.11, (window, size)).astype(np.float32)
            pooled = (reference.astype(np.float64).ravel(), recent.astype(np.float64).ravel())
            default = used = 0.0
            for _ in range(3):  # interleaved: the machine's speed drifts
                default += seconds(partial(ks_2samp, *pooled), args.rounds)
                used += seconds(partial(drift_statistic, reference, recent), args.rounds)
            difference = abs(ks_2samp(*pooled).statistic - drift_statistic(reference, recent))
            print(
                f"{images:9d}  {window:6d}  {default / 3 * 1e3:10.2f}  {used / 3 * 1e3:7.2f}"
                f"  {default / used:12.2f}  {difference:.1e}"
            )


if __name__ == "__main__":
    main()
