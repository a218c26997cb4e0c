"""Write the synthetic carpet set (seeded, MVTec AD layout) for tests, demos and benchmarks.

python -m detector synthetic-data OUT_ROOT [--category carpet] [--size 256] [--train 40] ...
python -m detector synthetic-data OUT_ROOT --high-resolution [--size 2048] [--labelled] ...
    (carpet_highres: native-scale weave, 6-20 px defects; detector/data/highres.py)
"""

from __future__ import annotations

import argparse

from detector.data.highres import make_highres_dataset
from detector.data.synthetic import make_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root")
    parser.add_argument("--category", default="carpet")
    parser.add_argument("--size", type=int, help="frame side in px (256; 2048 high-resolution)")
    parser.add_argument(
        "--high-resolution",
        action="store_true",
        help="large frames with small defects (spot, scratch): the set tiling is for",
    )
    parser.add_argument(
        "--labelled",
        action="store_true",
        help="with --high-resolution: a printed label on every frame, and its ignore_mask.png",
    )
    parser.add_argument("--train", type=int, default=40)
    parser.add_argument("--test-good", type=int, default=10)
    parser.add_argument("--per-defect", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    counts = {
        "n_train": args.train,
        "n_test_good": args.test_good,
        "n_per_defect": args.per_defect,
        "seed": args.seed,
    }
    if args.high_resolution:
        size = args.size or 2048
        folder = make_highres_dataset(args.root, size=size, labelled=args.labelled, **counts)
    else:
        folder = make_dataset(args.root, args.category, size=args.size or 256, **counts)
    print(f"wrote synthetic MVTec-layout dataset to {folder}")


if __name__ == "__main__":
    main()
