"""Fit a memory bank on defect-free images and calibrate its threshold.

python -m detector fit data.root=/data/mvtec data.category=carpet backbone=dinov3_vits16
python -m detector fit data=synthetic backbone=tiny_random
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from detector.anomaly_detector import AnomalyDetector, ImageSource, as_image
from detector.banks.products import check_product
from detector.banks.versions import file_sha256
from detector.commands.config import (
    CONFIG_PATH,
    augment_config,
    bank_config,
    build_backbone,
    build_dataset,
    check_dataset,
    runtime_options,
    save_resolved_config,
    scoring_config,
    seed_everything,
    tiling_config,
)
from detector.commands.tracking import Run, tracked
from detector.data.augment import AugmentConfig, AugmentedImages
from detector.data.layouts import Category
from detector.data.mvtec import split_calibration
from detector.errors import UserError, exits_on_user_error
from detector.extractor import FeatureExtractor
from detector.fitting import fit_detector
from detector.images import images_in
from detector.int8_check import INT8_FOLDER, PRECISIONS, check_image_count, status
from detector.quantized import make_int8
from detector.sessions import remember_images
from detector.threads import set_threads
from detector.tiling import TiledExtractor

log = logging.getLogger(__name__)


def calibration_plan(
    cfg: DictConfig, train: list[Path], dataset: Category
) -> tuple[list[Path], list[Path], str]:
    """(bank images, calibration images, where the calibration scores come from).

    A separate folder of later defect-free images (`data.calibration_dir`, or the layout's
    own: MVTec AD 2's validation/good) sets the threshold and the drift reference, and
    every training image goes into the bank; so does cross-fitting (`calibration_folds`
    >= 2, the default), which scores every training image with a bank built without it.
    `calibration_folds=0` holds `calibration_fraction` of the training images out instead
    (this project's behaviour before cross-fitting).
    """
    folder = cfg.data.get("calibration_dir")
    if folder:
        return train, images_in(Path(str(folder))), "session"
    if later := dataset.calibration_paths():  # a layout's own later session (MVTec AD 2)
        return train, later, "session"
    if int(cfg.calibration_folds) >= 2:
        return train, [], "cross_fitted"
    bank, held_out = split_calibration(train, float(cfg.calibration_fraction), int(cfg.seed))
    return bank, held_out, "held_out"


def serving_precision(cfg: DictConfig) -> str:
    """The precision the product asks to be served in (`precision`; f32 by default)."""
    precision = str(cfg.get("precision", "f32"))
    if precision not in PRECISIONS:
        raise UserError(
            f"precision={precision} is not offered: choose one of {', '.join(PRECISIONS)} "
            "(int8: a static INT8 backbone checked on this product's images, README "
            "'INT8 per product')."
        )
    if precision == "int8" and str(cfg.backbone.get("precision", "f32")) != "f32":
        raise UserError(
            "precision=int8 is checked against f32: fit with backbone.precision=f32 (this "
            f"fit asks for {cfg.backbone.precision})."
        )
    if precision == "int8" and tiling_config(cfg) is not None:
        raise UserError(
            "precision int8 is not offered for tiled products yet: fit with precision=f32."
        )
    return precision


def training_set(cfg: DictConfig, dataset: Category) -> tuple[list[Path], list[str]]:
    """The training images and each one's capture session (subfolders of train/good, or
    `data.sessions_manifest`)."""
    manifest = cfg.data.get("sessions_manifest")
    pairs = dataset.train_sessions(Path(str(manifest)) if manifest else None)
    return [path for path, _ in pairs], [session for _, session in pairs]


def fit_from_config(
    cfg: DictConfig,
    extractor: FeatureExtractor,
    images: Sequence[ImageSource],
    calibration_paths: list[Path],
    source: str,
    sessions: list[str],
    copies: int,
) -> AnomalyDetector:
    """`fit_detector` as the config says; augmented copies of one photo share its fold and
    its session. A tiled fit's frame size is its first image's."""
    tiling = tiling_config(cfg)
    if tiling is not None:
        extractor = TiledExtractor(extractor, tiling.for_frame(as_image(images[0]).size))
    return fit_detector(
        extractor,
        images,
        calibration_paths,
        folds=int(cfg.calibration_folds),
        groups=[index // copies for index in range(len(images))],
        sessions=[sessions[index // copies] for index in range(len(images))],
        rule=str(cfg.threshold_rule),
        calibration_source=source,
        bank_config=bank_config(cfg),
        scoring=scoring_config(cfg),
        batch_size=int(cfg.batch_size),
        progress=bool(cfg.progress),
    )


def fit(cfg: DictConfig, run_dir: Path) -> AnomalyDetector:
    """Fit and save a detector as the config says; returns it for callers like the demo."""
    with tracked(cfg, "fit") as run:
        return _fit(cfg, run_dir, run)


def fit_summary(
    cfg: DictConfig,
    detector: AnomalyDetector,
    model_dir: Path,
    bank_images: int,
    augmentation: AugmentConfig,
) -> dict[str, Any]:
    """What fit_summary.json and the tracking run say of a fit: the extractor, the images,
    the bank, and what the calibration promises."""
    extractor = detector.extractor
    return {
        "model_dir": str(model_dir),
        "category": str(cfg.data.category),
        "product": str(cfg.product),
        "backbone": extractor.spec.to_dict(),
        "random_weights": extractor.random_weights,
        "runtime": runtime_options(cfg.backbone),
        "n_bank_images": bank_images,
        "augmented_copies_per_image": augmentation.copies_per_image,
        "n_calibration_images": len(detector.calibration.reference_scores),
        "calibration": {
            "rule": detector.calibration.rule,
            "source": detector.calibration.source,
            "folds": detector.bank.metadata.get("calibration_folds"),
            **detector.calibration.estimate(),
        },
        "tiling": detector.bank.metadata.get("tiling"),
        "bank_size": detector.bank.size,
        "n_train_features": detector.bank.metadata["n_train_features"],
        "threshold": detector.calibration.threshold,
    }


def _fit(cfg: DictConfig, run_dir: Path, run: Run) -> AnomalyDetector:
    save_resolved_config(cfg, run_dir)
    seed_everything(int(cfg.seed))
    set_threads(cfg.num_threads)
    # Cheap checks, then the backbone (a missing checkpoint or an unreachable hub is found in
    # seconds), then the data work (a synthetic set may be generated).
    check_dataset(cfg.data)
    product = check_product(str(cfg.product))
    precision = serving_precision(cfg)  # refused before the backbone loads
    extractor = build_backbone(cfg.backbone, cfg.num_threads)
    dataset = build_dataset(cfg.data, int(cfg.seed))
    train, sessions = training_set(cfg, dataset)
    bank_paths, calibration_paths, source = calibration_plan(cfg, train, dataset)
    session_of = dict(zip(train, sessions, strict=True))
    check_paths: list[Path] = []
    if precision == "int8":  # defect-free images the bank never sees, to check int8 on
        count = check_image_count(len(bank_paths))
        bank_paths, check_paths = split_calibration(bank_paths, 0.0, int(cfg.seed), count)
    augmentation = augment_config(cfg)
    bank_images = AugmentedImages(bank_paths, augmentation) if augmentation.enabled else bank_paths
    copies = augmentation.copies_per_image if augmentation.enabled else 1
    started = time.perf_counter()
    bank_sessions = [session_of[path] for path in bank_paths]
    detector = fit_from_config(
        cfg, extractor, bank_images, calibration_paths, source, bank_sessions, copies
    )
    detector.bank.metadata["category"] = str(cfg.data.category)
    detector.bank.metadata["product"] = product
    detector.bank.metadata["augmentation"] = asdict(augmentation)
    used = [*bank_paths, *calibration_paths, *check_paths]  # none may come back later
    remember_images(detector.bank.metadata, [file_sha256(path) for path in used])
    if run.run_id:  # `detector export` puts it on the BentoML models' labels
        detector.bank.metadata["mlflow_run_id"] = run.run_id
    model_dir = Path(str(cfg.model_dir))
    shutil.rmtree(model_dir / INT8_FOLDER, ignore_errors=True)  # never a stale graph
    if precision == "int8":
        make_int8(detector, bank_paths, check_paths, model_dir, cfg.num_threads)
    model_dir = detector.save(model_dir)
    summary = fit_summary(cfg, detector, model_dir, len(bank_paths), augmentation)
    summary["int8"] = status(detector.bank.metadata, detector.bank.size)
    summary["sessions"] = dict(Counter(sessions))  # every training image, held out or not
    summary["fit_seconds"] = round(time.perf_counter() - started, 2)
    (run_dir / "fit_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    run.metrics(summary)
    run.tags(
        {"fingerprint": extractor.spec.fingerprint, "random_weights": extractor.random_weights}
    )
    run.artifacts(run_dir / "fit_summary.json", run_dir / "resolved_config.yaml")
    log.info("saved detector to %s (bank %d rows)", model_dir, detector.bank.size)
    print(f"next: python -m detector evaluate (same overrides), then export {model_dir}")
    return detector


@hydra.main(config_path=CONFIG_PATH, config_name="config", version_base="1.3")
@exits_on_user_error
def main(cfg: DictConfig) -> None:
    fit(cfg, Path(HydraConfig.get().runtime.output_dir))


if __name__ == "__main__":
    main()
