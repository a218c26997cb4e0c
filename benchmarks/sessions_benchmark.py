"""Calibration across capture sessions on the synthetic session set, in one run.

    python -m benchmarks.sessions_benchmark [--train 30] [--test-good 150] [--per-defect 12]
                                            [--resolution 224]

The training images span two capture sessions of the synthetic carpet line (sessions 0
and 1, `--train` images each, in `train/good/s0` and `s1`); the test parts come from
session 2, a later shift (each session a little brighter, a warmer yarn, the camera
closer and turned: `detector.data.synthetic.Session`). Three fits through `fit_detector`:

- one session, random folds: session 0 alone, cross-fitted (the default with one session);
- sessions pooled, random folds: both sessions, folds that ignore them;
- leave one session out: both sessions, each scored by a bank of the other (the default
  with two or more sessions);
- session 1 joined later: session 0's fit, then session 1's images added as a later session
  (`add-images --session`, `detector.sessions.join_session`): scored by session 0's bank,
  they set the threshold, then join the bank.

At 1 % and 5 % targets (empirical quantile) prints, per fit, the share of session-2
defect-free parts flagged and of defective parts found, and what each fit promised.
ViT-S/16-shaped random DINOv3, 1 % coreset.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.threshold_benchmark import session_shift_set, test_scores
from detector.anomaly_detector import iter_features
from detector.banks.versions import file_sha256
from detector.fitting import fit_detector
from detector.memory_bank import BankConfig
from detector.scoring import Calibration
from detector.sessions import join_session
from detector.thresholds import EmpiricalQuantile

TARGETS = (0.01, 0.05)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=30, help="images per training session")
    parser.add_argument("--test-good", type=int, default=150)
    parser.add_argument("--per-defect", type=int, default=12)
    parser.add_argument("--resolution", type=int, default=224)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch_name:
        scratch = Path(scratch_name)
        dataset, extractor, labels, features = session_shift_set(
            scratch,
            args.resolution,
            n_train=args.train,
            n_test_good=args.test_good,
            n_per_defect=args.per_defect,
            train_sessions=2,
        )
        pairs = dataset.train_sessions()
        paths, sessions = [p for p, _ in pairs], [s for _, s in pairs]
        first = [p for p, s in pairs if s == "s0"]
        config = BankConfig(coreset_ratio=0.01, seed=0)
        plans = {
            "one session, random folds": (first, None),
            "sessions pooled, random folds": (paths, None),
            "leave one session out": (paths, sessions),
        }
        rows = []
        fits = {
            name: fit_detector(extractor, train, sessions=named, bank_config=config, progress=False)
            for name, (train, named) in plans.items()
        }
        later_paths = [p for p, s in pairs if s == "s1"]
        later = np.concatenate(list(iter_features(extractor, later_paths, 8)))
        fits["session 1 joined later"] = join_session(
            fits["one session, random folds"],
            "s1",
            later,
            [file_sha256(path) for path in later_paths],
            "both",
        ).detector
        for name, detector in fits.items():
            scores = test_scores(detector, features, args.resolution)
            good, bad = scores[labels == 0], scores[labels == 1]
            calibration = np.asarray(detector.calibration.reference_scores)
            for target in TARGETS:
                threshold = EmpiricalQuantile().threshold(calibration, target)
                estimate = Calibration(threshold, target, list(calibration)).estimate()
                rows.append(
                    {
                        "fit": name,
                        "source": detector.calibration.source,
                        "target": target,
                        "false_alarms": round(float(np.mean(good > threshold)), 4),
                        "detected": round(float(np.mean(bad > threshold)), 4),
                        "expected": estimate["expected_false_alarm_rate"],
                        "upper_95": estimate["upper_bound"],
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
        print(
            "| fit | target | later session: false alarms | defects found | promised (upper 95 %) |"
        )
        print("| --- | --- | --- | --- | --- |")
        for row in rows:
            print(
                f"| {row['fit']} | {row['target']:.0%} | {row['false_alarms']:.1%} | "
                f"{row['detected']:.1%} | {row['expected']:.1%} ({row['upper_95']:.1%}) |"
            )
        counts = {"train_per_session": args.train, "test_good": int((labels == 0).sum())}
        counts["test_defective"] = int((labels == 1).sum())
        print("RESULTS " + json.dumps({"images": counts, "rows": rows}))


if __name__ == "__main__":
    main()
