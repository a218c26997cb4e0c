"""Turn a Hydra config into detector objects, and user mistakes into one-sentence exits.

Shared by `detector.fit`, `detector.evaluate` and `detector.demo` so every entry point
builds backbones, datasets and configs the same way.
"""

from __future__ import annotations

import functools
import logging
import os
import random
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from detector.augment import AugmentConfig
from detector.backbone import BackboneUnavailableError, DinoBackbone
from detector.data import MVTecCategory, Sample
from detector.images import InvalidImageError
from detector.memory_bank import BankConfig
from detector.predictor import AnomalyDetector, IncompatibleBankError
from detector.scoring import ScoringConfig

log = logging.getLogger(__name__)
USER_ERRORS = (
    BackboneUnavailableError,
    FileNotFoundError,
    IncompatibleBankError,
    InvalidImageError,
    ValueError,
)


def exit_on_user_error(main: Callable[..., Any]) -> Callable[..., Any]:
    """Print a user error as one line on stderr and exit 2, instead of a traceback.

    Set DETECTOR_DEBUG=1 to get the traceback back when the one line is not enough.
    """

    @functools.wraps(main)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return main(*args, **kwargs)
        except USER_ERRORS as error:
            if os.environ.get("DETECTOR_DEBUG"):
                raise
            print(f"error: {error}", file=sys.stderr)
            sys.exit(2)

    return wrapper


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def set_threads(num_threads: int | None) -> None:
    """Pin torch and faiss threads: on a shared box oversubscription costs more than it gives."""
    if num_threads:
        torch.set_num_threads(int(num_threads))
        faiss.omp_set_num_threads(int(num_threads))


def build_backbone(backbone: DictConfig, num_threads: int | None = None) -> DinoBackbone:
    name = str(backbone.name)
    if backbone.get("random_preset") and not Path(name).exists():
        from detector.make_tiny_backbone import make_backbone

        log.warning("writing a random %s backbone to %s", backbone.random_preset, name)
        make_backbone(name, backbone.random_preset)
    return DinoBackbone(
        name,
        layers=list(backbone.layers),
        resolution=int(backbone.resolution),
        device=str(backbone.device),
        half_precision=bool(backbone.half_precision),
        num_threads=num_threads,
    )


def build_dataset(data: DictConfig, seed: int) -> MVTecCategory:
    """The MVTec-layout category; a synthetic one is generated on first use."""
    if OmegaConf.is_missing(data, "root"):
        raise ValueError("data.root is not set: pass data.root=/path/to/mvtec (or data=synthetic)")
    dataset = MVTecCategory(Path(str(data.root)), str(data.category))
    if data.get("generate") and not dataset.folder.exists():
        from detector.synthetic import make_dataset

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
    )
    return samples, detector
