"""Replace a fitted bank's drift reference with profiles of images you choose.

    python -m detector set-drift-reference models/carpet /data/line3/accepted-relit
    python -m detector export models/carpet        # a new bank-carpet version to serve

By default the reference is the calibration images held out at fit time. After a change
that was checked and accepted (new lights, a new camera), or to compare against a known-good
week of production instead, point this at those defect-free images: the drift statistic then
measures distance from them. The bank and its threshold stay as they are.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from detector.anomaly_detector import AnomalyDetector
from detector.drift import profile_to_list
from detector.errors import exits_on_user_error
from detector.images import images_in
from detector.scoring import Calibration


def set_reference(model_dir: Path, image_dir: Path, limit: int | None = None) -> Calibration:
    """Score the images, store their profiles as the reference, and save the bank folder."""
    paths = images_in(image_dir)[:limit]
    detector = AnomalyDetector.load(model_dir)
    results = detector.predict(paths, with_maps=False, progress=True)
    detector.calibration.reference_profiles = [
        profile_to_list(result.drift_profile) for result in results
    ]
    detector.bank.metadata["drift_reference"] = {"source": str(image_dir), "images": len(paths)}
    detector.save(model_dir)
    return detector.calibration


@exits_on_user_error
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path, help="a fitted detector folder (bank.json)")
    parser.add_argument("image_dir", type=Path, help="defect-free images for the reference")
    parser.add_argument("--limit", type=int, help="use at most this many images")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    calibration = set_reference(args.model_dir, args.image_dir, args.limit)
    print(
        f"drift reference of {args.model_dir}: {len(calibration.reference_profiles)} images "
        f"from {args.image_dir}; run `python -m detector export {args.model_dir}` to serve it"
    )


if __name__ == "__main__":
    main()
