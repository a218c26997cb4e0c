"""Where the batch job's scores come from: the service's runner in-process, or a live service.

In-process, the job instantiates `service.InspectionRunner`, the class `bentoml serve` runs,
with the same models from the BentoML store, and scores through its `AnomalyDetector`. With
`--url`, each image goes to a running service's /inspect (or /heatmap) endpoint instead.
"""

from __future__ import annotations

import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from batch.loader import LoadedImage
from detector.drift_statistics import profile_to_list


class BatchSetupError(RuntimeError):
    """The job cannot start; the message says what to do."""


def _row(relative: str, result: dict[str, Any], tags: dict[str, str]) -> dict[str, Any]:
    """A journal row; the drift profile is kept so a resumed or merged run's drift counts
    every image, not only those scored in the last process."""
    return {
        "path": relative,
        "score": result["score"],
        "threshold": result["threshold"],
        "normalized_score": result["normalized_score"],
        "is_anomalous": result["is_anomalous"],
        "image_width": result["image_width"],
        "image_height": result["image_height"],
        "backbone_model": tags.get("backbone", ""),
        "bank_model": tags.get("bank", ""),
        "error": "",
        "drift_profile": result.get("drift_profile"),
    }


def load_runner(bank_tag: str | None, backbone_tag: str | None) -> Any:
    """The service's runner class, instantiated here, with the bank (and its backbone) chosen."""
    import bentoml
    from bentoml.exceptions import NotFound

    from detector.model_store import BACKBONE_MODEL, BANK_MODEL

    wanted = bank_tag or f"{BANK_MODEL}:latest"
    try:
        bank = bentoml.models.get(wanted)
    except NotFound:
        raise BatchSetupError(
            f"Model '{wanted}' is not in the BentoML model store (BENTOML_HOME="
            f"{os.environ.get('BENTOML_HOME', '~/bentoml')}): run `python -m detector.export "
            "<model_dir>` or pass --model with a tag that `bentoml models list` shows."
        ) from None
    backbone = (
        backbone_tag or bank.info.metadata.get("backbone_model") or f"{BACKBONE_MODEL}:latest"
    )
    os.environ["INSPECT_BANK_MODEL"] = str(bank.tag)
    os.environ["INSPECT_BACKBONE_MODEL"] = str(backbone)
    try:
        import service
    except SystemExit as refusal:  # service.py refuses a missing or mismatched pair
        raise BatchSetupError(str(refusal).removeprefix("error: ")) from None
    return service.InspectionRunner()


class LocalScorer:
    """Scores prepared batches through the runner's detector, in this process."""

    def __init__(self, bank_tag: str | None, backbone_tag: str | None, batch_size: int) -> None:
        self.runner = load_runner(bank_tag, backbone_tag)
        self.detector = self.runner.detector
        self.detector.batch_size = batch_size
        self.tags = {
            "backbone": self.runner.info["backbone_model"],
            "bank": self.runner.info["bank_model"],
        }
        self.prepare = self.detector.extractor.prepare

    def score(
        self, batch: list[LoadedImage], with_maps: bool
    ) -> list[tuple[dict, np.ndarray | None]]:
        prepared = np.stack([item.prepared for item in batch])
        sizes = [item.image.size for item in batch]
        results = self.detector.predict_prepared(prepared, sizes, with_maps)
        return [
            (
                _row(
                    item.relative_path,
                    {**result.to_dict(), "drift_profile": profile_to_list(result.drift_profile)},
                    self.tags,
                ),
                result.anomaly_map,
            )
            for item, result in zip(batch, results, strict=True)
        ]

    def drift_reference(self) -> np.ndarray:
        return self.runner.drift.reference


class RemoteScorer:
    """Sends images to a running inspection service, several at a time so it can batch."""

    prepare = None

    def __init__(self, url: str, root: Path, concurrency: int, api_key: str | None) -> None:
        import bentoml
        import httpx

        self.url, self.root = url.rstrip("/"), root
        self.headers = {"X-API-Key": api_key} if api_key else {}
        self.pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="client")
        self.local = threading.local()
        try:
            info = httpx.post(f"{self.url}/model_info", headers=self.headers, timeout=30).json()
        except httpx.HTTPError as error:
            raise BatchSetupError(
                f"No inspection service answers at {self.url}: {error}."
            ) from None
        self.tags = {"backbone": info.get("backbone_model", ""), "bank": info.get("bank_model", "")}
        self._client_class = bentoml.SyncHTTPClient

    def _client(self) -> Any:
        """One BentoML client per worker thread (a client holds one connection pool)."""
        if not hasattr(self.local, "client"):
            self.local.client = self._client_class(self.url, server_ready_timeout=30)
            self.local.client.client.headers.update(self.headers)
        return self.local.client

    def _inspect(self, item: LoadedImage) -> dict:
        from bentoml.exceptions import BentoMLException

        try:
            result = self._client().inspect(
                image=self.root / item.relative_path, drift_profile=True
            )
        except BentoMLException as error:
            return {"path": item.relative_path, "error": f"HTTP {error.error_code.value}: {error}"}
        return _row(item.relative_path, result, self.tags)

    def _one(self, item: LoadedImage, with_maps: bool) -> tuple[dict, bytes | None]:
        import httpx

        if not with_maps:
            return self._inspect(item), None
        path = self.root / item.relative_path
        files = {"image": (path.name, path.read_bytes(), "application/octet-stream")}
        response = httpx.post(
            f"{self.url}/heatmap",
            files=files,
            data={"drift_profile": "true"},
            headers=self.headers,
            timeout=600,
        )
        if response.status_code != 200:
            try:
                message = response.json().get("error", response.text)
            except ValueError:
                message = response.text
            return {
                "path": item.relative_path,
                "error": f"HTTP {response.status_code}: {message}",
            }, None
        result = json.loads(response.headers["x-inspection"])
        return _row(item.relative_path, result, self.tags), response.content

    def score(self, batch: list[LoadedImage], with_maps: bool) -> list[tuple[dict, bytes | None]]:
        return list(self.pool.map(lambda item: self._one(item, with_maps), batch))

    def drift_reference(self) -> np.ndarray:
        """The calibration profiles of the bank the service runs, from its /drift endpoint."""
        import httpx

        response = httpx.post(
            f"{self.url}/drift", json={"reference": True}, headers=self.headers, timeout=60
        )
        response.raise_for_status()
        return np.asarray(response.json().get("reference_profiles", []), dtype=np.float32)
