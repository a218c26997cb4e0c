"""Experiment tracking with MLflow for fit, evaluate and simulate-drift.

Every tracked run logs the resolved Hydra config as parameters, its metrics, its files
(metrics.json, plots, reports) as artifacts, and the backbone's weights fingerprint as a tag;
`fit` writes its run id into the bank, so `detector export` labels the BentoML models with it
and every served bank leads back to the experiment that made it.

The default store is a local folder (`tracking.uri`, `file:./mlruns`); any tracking server
works through the same setting. Tracking must never cost a run: `tracking.enabled=false`
imports nothing, and an unreachable server or any MLflow error becomes one warning while the
command completes.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)
# MLflow retries an unreachable server with backoff for minutes (measured: 247 s); one short
# try is enough to tell "not there" from "there".
FAST_FAILURE = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}


class Run:
    """A tracked run; every call is best-effort after the first failure is reported."""

    def __init__(self, mlflow: Any | None = None, run_id: str | None = None) -> None:
        self._mlflow = mlflow
        self.run_id = run_id

    def _try(self, what: str, call: Any, *args: Any) -> None:
        if self._mlflow is None:
            return
        try:
            call(*args)
        except Exception as error:  # tracking never fails a run
            log.warning("experiment tracking stopped (%s failed: %s)", what, error)
            self._mlflow = None

    def metrics(self, values: dict[str, Any]) -> None:
        numbers = {
            key: float(value)
            for key, value in values.items()
            if isinstance(value, int | float) and not isinstance(value, bool)
        }
        if self._mlflow is not None:
            self._try("log_metrics", self._mlflow.log_metrics, numbers)

    def artifacts(self, *paths: Path) -> None:
        for path in paths:
            if path.is_file() and self._mlflow is not None:
                self._try("log_artifact", self._mlflow.log_artifact, str(path))

    def tags(self, values: dict[str, Any]) -> None:
        if self._mlflow is not None:
            self._try("set_tags", self._mlflow.set_tags, {k: str(v) for k, v in values.items()})


def flat_params(cfg: DictConfig) -> dict[str, str]:
    """The resolved config as dotted keys (MLflow params are flat strings, 6,000 chars)."""
    flat: dict[str, str] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(f"{prefix}.{key}" if prefix else str(key), value)
        else:
            flat[prefix] = str(node)[:6000]

    container = OmegaConf.to_container(cfg, resolve=True)
    walk("", {k: v for k, v in container.items() if k != "hydra"})
    return flat


@contextmanager
def tracked(cfg: DictConfig, run_name: str) -> Iterator[Run]:
    """An MLflow run around a command, or a run that records nothing."""
    settings = cfg.get("tracking") or {}
    if not settings.get("enabled", False):
        yield Run()
        return
    uri = str(settings.get("uri") or "file:./mlruns")
    try:
        for name, value in FAST_FAILURE.items():
            os.environ.setdefault(name, value)
        if uri.startswith("file:"):
            # MLflow 3 keeps the folder store in maintenance mode behind this switch; it is
            # the embedded store that needs no server and no database.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        import mlflow

        mlflow.set_tracking_uri(uri)
        mlflow.set_experiment(str(settings.get("experiment") or "dino-inspect"))
        active = mlflow.start_run(run_name=run_name)
    except Exception as error:
        log.warning("experiment tracking is off for this run (%s: %s)", uri, error)
        yield Run()
        return
    run = Run(mlflow, active.info.run_id)
    try:
        run._try("log_params", mlflow.log_params, flat_params(cfg))
        yield run
    finally:
        try:
            mlflow.end_run()
        except Exception as error:
            log.warning("experiment tracking could not close its run: %s", error)
