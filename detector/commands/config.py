"""Turn a Hydra config into detector objects: the shared start of the Hydra commands.

`fit`, `evaluate`, `simulate-drift` and `demo` build backbones, datasets and configs here, so
every entry point reads a config the same way.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from detector.anomaly_detector import AnomalyDetector
from detector.backbone import build_extractor
from detector.data.augment import AugmentConfig
from detector.data.layouts import Category, open_category
from detector.data.mvtec import Sample
from detector.errors import UserError
from detector.extractor import FeatureExtractor
from detector.memory_bank import BankConfig
from detector.scoring import ScoringConfig
from detector.threads import set_threads
from detector.tiling import Tiling

log = logging.getLogger(__name__)
# Hydra's config package; `python -m detector <command> --help` lists its groups.
CONFIG_PATH = "pkg://detector.conf"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_backbone(backbone: DictConfig, num_threads: int | None = None) -> FeatureExtractor:
    name = str(backbone.name)
    if backbone.get("random_preset") and not Path(name).exists():
        from detector.commands.random_backbone import make_backbone

        log.warning("writing a random %s backbone to %s", backbone.random_preset, name)
        make_backbone(name, backbone.random_preset)
    return build_extractor(
        name,
        layers=list(backbone.layers),
        resolution=int(backbone.resolution),
        device=str(backbone.device),
        half_precision=bool(backbone.half_precision),
        num_threads=num_threads,
        **runtime_options(backbone),
    )


def runtime_options(backbone: DictConfig) -> dict[str, str]:
    """The backbone's runtime and precision (configs written before runtimes: torch, f32)."""
    return {
        "runtime": str(backbone.get("runtime", "torch")),
        "precision": str(backbone.get("precision", "f32")),
    }


def tiling_config(cfg: DictConfig) -> Tiling | None:
    """The fit's `tiling.*` settings, or None when tiling is off (configs before tiling)."""
    settings = cfg.get("tiling")
    if not settings or not settings.get("enabled"):
        return None
    return Tiling(
        enabled=True,
        tile=int(settings.tile),
        overlap=float(settings.overlap),
        scale=float(settings.scale),
    )


def check_dataset(data: DictConfig) -> Category:
    """The cheap part of `build_dataset`: a missing data.root, or a real dataset's missing
    folder, is refused before anything slow (loading a backbone, generating data) runs."""
    if OmegaConf.is_missing(data, "root"):
        raise ValueError("data.root is not set: pass data.root=/path/to/mvtec (or data=synthetic)")
    layout = str(data.get("layout") or "mvtec")
    dataset = open_category(layout, Path(str(data.root)), str(data.category))
    if not data.get("generate"):
        dataset.train_paths()  # says where it looked, in the data set's layout
    return dataset


def build_dataset(data: DictConfig, seed: int) -> Category:
    """The category in its layout (`data.layout`); a synthetic one is generated on first use."""
    dataset = check_dataset(data)
    if data.get("generate") and not dataset.folder.exists():
        from detector.data.synthetic import make_dataset

        log.info("generating a synthetic dataset in %s", dataset.folder)
        make_dataset(data.root, data.category, seed=seed, **OmegaConf.to_container(data.generate))
    return dataset


def augment_config(cfg: DictConfig) -> AugmentConfig:
    return AugmentConfig(**OmegaConf.to_container(cfg.augment), seed=int(cfg.seed))


def bank_config(cfg: DictConfig) -> BankConfig:
    return BankConfig(**OmegaConf.to_container(cfg.bank), seed=int(cfg.seed))


def scoring_config(cfg: DictConfig) -> ScoringConfig:
    return ScoringConfig(**OmegaConf.to_container(cfg.scoring))


def save_resolved_config(cfg: DictConfig, run_dir: Path) -> Path:
    """Hydra keeps the unresolved config in .hydra/; this one has every interpolation filled."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "resolved_config.yaml"
    path.write_text(OmegaConf.to_yaml(cfg, resolve=True))
    return path


def start_test_run(cfg: DictConfig, run_dir: Path) -> tuple[list[Sample], AnomalyDetector]:
    """The common start of commands that score a fitted detector on the test split
    (`evaluate`, `drift`): config saved, seeds and threads set, samples and detector loaded."""
    save_resolved_config(cfg, run_dir)
    seed_everything(int(cfg.seed))
    set_threads(cfg.num_threads)
    samples = build_dataset(cfg.data, int(cfg.seed)).test_samples()
    if not samples:
        raise FileNotFoundError(f"no test images under {cfg.data.root}/{cfg.data.category}/test")
    detector = AnomalyDetector.load(
        str(cfg.model_dir),
        batch_size=int(cfg.batch_size),
        device=str(cfg.backbone.device),
        half_precision=bool(cfg.backbone.half_precision),
        num_threads=cfg.num_threads,
        **runtime_options(cfg.backbone),
    )
    if str(cfg.get("precision", "f32")) == "int8":  # the product's int8 graph, as served
        from detector.quantized import product_extractor

        bank = detector.bank
        int8, state = product_extractor(
            Path(str(cfg.model_dir)), bank.metadata, bank.size, detector.extractor, cfg.num_threads
        )
        if state is None:
            raise UserError(
                f"{cfg.model_dir} was fitted with precision f32: there is no int8 graph to "
                "evaluate (fit it with precision=int8, or evaluate with precision=f32)."
            )
        detector = AnomalyDetector(
            int8, bank, detector.calibration, detector.scoring, detector.batch_size
        )
    return samples, detector
