"""Threshold rules and calibration sources on the session-shift synthetic set, in one run.

    python -m benchmarks.threshold_benchmark [--train 60] [--calibration 40] [--test-good 200]
                                             [--per-defect 20] [--resolution 224]

The training images come from session 0; 40 defect-free calibration images from session 1;
the test images from session 2 (each later session a little brighter, a warmer yarn, the
camera closer and turned: `detector.data.synthetic.Session`). Each calibration source is
fitted once through `fit_detector` (its wall time is the fit's cost):

- held-out 10 %: the bank from 90 % of the training images, 10 % held out to calibrate;
- cross-fitted: the bank from every training image, each also scored by a 5-fold bank;
- calibration session: the bank from every training image, session 1 to calibrate.

Then every rule (detector.thresholds) at 1 % and 5 % targets sets a threshold from that
source's scores, and the session-2 test images say what it gave: the share of defect-free
parts flagged and of defective parts found. ViT-S/16-shaped random DINOv3, 1 % coreset.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

from detector.anomaly_detector import AnomalyDetector
from detector.commands.random_backbone import make_backbone
from detector.data.mvtec import MVTecCategory, split_calibration
from detector.data.synthetic import make_dataset
from detector.dino import DinoBackbone
from detector.fitting import fit_detector, iter_features
from detector.memory_bank import BankConfig
from detector.scoring import Calibration
from detector.thresholds import RULES

TARGETS = (0.01, 0.05)


def test_scores(detector: AnomalyDetector, features: np.ndarray, size: int) -> np.ndarray:
    results = detector.score_features(features, [(size, size)] * len(features), with_maps=False)
    return np.array([result.score for result in results])


def session_shift_set(
    scratch: Path, resolution: int, **generate: int
) -> tuple[MVTecCategory, DinoBackbone, np.ndarray, np.ndarray]:
    """The session-shift synthetic line under `scratch` (test parts from session 2; `generate`
    as `make_dataset` takes it), the ViT-S/16-shaped random extractor, and the test parts'
    labels and features (extracted once for every fit)."""
    make_dataset(scratch / "data", size=256, sessions=3, **generate)
    dataset = MVTecCategory(scratch / "data", "carpet")
    extractor = DinoBackbone(
        str(make_backbone(scratch / "vits16", "vits16")), resolution=resolution, device="cpu"
    )
    samples = dataset.test_samples()
    labels = np.array([sample.label for sample in samples])
    features = np.concatenate(list(iter_features(extractor, [s.path for s in samples], 8)))
    return dataset, extractor, labels, features


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=60)
    parser.add_argument("--calibration", type=int, default=40)
    parser.add_argument("--test-good", type=int, default=200)
    parser.add_argument("--per-defect", type=int, default=20)
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--folds", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch_name:
        scratch = Path(scratch_name)
        dataset, extractor, labels, test_features = session_shift_set(
            scratch,
            args.resolution,
            n_train=args.train,
            n_test_good=args.test_good,
            n_per_defect=args.per_defect,
            n_calibration=args.calibration,
        )
        train = dataset.train_paths()
        session = sorted((dataset.folder / "calibration" / "good").glob("*.png"))
        config = BankConfig(coreset_ratio=0.01, seed=0)
        bank_images, held_out = split_calibration(train, 0.1, 0)
        plans = {
            "held-out 10 %": (bank_images, held_out, 0),
            f"cross-fitted ({args.folds} folds)": (train, None, args.folds),
            "calibration session": (train, session, 0),
        }
        report: dict = {"images": {"train": len(train), "calibration_session": len(session)}}
        report["images"]["test_good"] = int((labels == 0).sum())
        report["images"]["test_defective"] = int((labels == 1).sum())
        rows = []
        for name, (bank_paths, calibration_paths, folds) in plans.items():
            started = time.perf_counter()
            detector = fit_detector(
                extractor,
                bank_paths,
                calibration_paths,
                folds=folds or 5,
                bank_config=config,
                progress=False,
            )
            seconds = time.perf_counter() - started
            scores = test_scores(detector, test_features, args.resolution)
            good, bad = scores[labels == 0], scores[labels == 1]
            calibration_scores = np.asarray(detector.calibration.reference_scores)
            auroc = float(roc_auc_score(labels, scores))
            report[name] = {
                "fit_seconds": round(seconds, 2),
                "calibration_scores": int(calibration_scores.size),
                "image_auroc": round(auroc, 4),
            }
            for target in TARGETS:
                for rule in RULES.values():
                    threshold = rule.threshold(calibration_scores, target)
                    estimate = Calibration(threshold, target, list(calibration_scores)).estimate()
                    rows.append(
                        {
                            "source": name,
                            "target": target,
                            "rule": rule.name,
                            "threshold": round(threshold, 5),
                            "false_alarms": round(float(np.mean(good > threshold)), 4),
                            "detected": round(float(np.mean(bad > threshold)), 4),
                            "expected": estimate["expected_false_alarm_rate"],
                            "upper_95": estimate["upper_bound"],
                        }
                    )
            print(json.dumps({name: report[name]}), flush=True)
        report["rows"] = rows
        print("| source | target | rule | false alarms | detected | expected (upper 95 %) |")
        print("| --- | --- | --- | --- | --- | --- |")
        for row in rows:
            print(
                f"| {row['source']} | {row['target']:.0%} | {row['rule']} | "
                f"{row['false_alarms']:.1%} | {row['detected']:.1%} | "
                f"{row['expected']:.1%} ({row['upper_95']:.1%}) |"
            )
        print("RESULTS " + json.dumps(report))


if __name__ == "__main__":
    main()
