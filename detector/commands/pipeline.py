"""Fit, evaluate and export in one go: the training job a container runs once.

    python -m detector pipeline data.root=/data/mvtec data.category=carpet \
        +ship_to=/mnt/models/carpet          # optional: bentoml models export, for import

The same image that serves (`bentoml containerize`) runs this as a one-shot job (Cloud Run
Job, Kubernetes Job, GPU or CPU). With `+ship_to=PATH` (a local folder, a mounted bucket, or
anything `bentoml models export` accepts, such as s3:// or gs:// with their fsspec packages),
both models are written there with BentoML's own export, and the serving side takes them in
with `bentoml models import PATH/<file>`: the same archives `bentoml build` would pack.
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from detector.commands import export
from detector.commands.config import CONFIG_PATH
from detector.commands.evaluate import evaluate
from detector.commands.fit import fit
from detector.errors import exits_on_user_error
from detector.reports.evaluation import METRICS_FILE

log = logging.getLogger(__name__)


def ship(tags: list[str], destination: str) -> list[str]:
    """`bentoml models export` each model to `destination`; returns the archive paths."""
    import bentoml

    if "://" not in destination:
        Path(destination).mkdir(parents=True, exist_ok=True)
    shipped = []
    for tag in tags:
        name = tag.replace(":", "-") + ".bentomodel"
        shipped.append(bentoml.models.export_model(tag, f"{destination.rstrip('/')}/{name}"))
    return shipped


def run(cfg: DictConfig, run_dir: Path) -> list[str]:
    fit(cfg, run_dir / "fit")
    evaluate(cfg, run_dir / "evaluate")
    backbone, bank = export.export_models(
        Path(str(cfg.model_dir)),
        metrics=run_dir / "evaluate" / METRICS_FILE,
        force=bool(cfg.get("force", False)),  # +force=true: see `detector export --force`
    )
    tags = [str(backbone.tag), str(bank.tag)]
    print(f"saved models {tags[0]} and {tags[1]}")
    if cfg.get("ship_to"):
        for archive in ship(tags, str(cfg.ship_to)):
            print(f"shipped {archive}: on the serving side, `bentoml models import {archive}`")
    else:
        print("next: bentoml serve (or bentoml build && bentoml containerize)")
    return tags


@hydra.main(config_path=CONFIG_PATH, config_name="config", version_base="1.3")
@exits_on_user_error
def main(cfg: DictConfig) -> None:
    run(cfg, Path(HydraConfig.get().runtime.output_dir))


if __name__ == "__main__":
    main()
