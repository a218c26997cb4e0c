"""Where the batch job's scores come from: the detector in-process, or a live service.

In-process, the job loads the model pair from the BentoML store with the same `load_pair`
the service's runner uses and scores through the same `AnomalyDetector`. With `--url`, each
image goes to a running service's /inspect (or /heatmap) endpoint instead. Either way a
result becomes a journal row through `detector.schema`, so the rows look alike.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image

from batch.loader import LoadedImage
from detector import schema
from detector.drift import profile_to_list
from detector.errors import UserError

Scored = tuple[dict[str, Any], Any]  # (journal row, anomaly map or heatmap PNG bytes or None)


class BatchSetupError(UserError):
    """The job cannot start; the message says what to do."""


class Scorer(Protocol):
    """What the job needs from a source of scores."""

    # Preprocessing the loader threads run ahead of scoring; None: the scorer reads files.
    prepare: Callable[[Image.Image], np.ndarray] | None

    def score(self, batch: list[LoadedImage], with_maps: bool) -> list[Scored]: ...

    def drift_reference(self) -> np.ndarray:
        """The calibration profiles of the bank that scores, for the run's drift report."""
        ...


class LocalScorer:
    """Scores prepared batches through the stored detector, in this process."""

    def __init__(
        self,
        bank_tag: str | None,
        backbone_tag: str | None,
        batch_size: int,
        device: str = "auto",
        num_threads: int | None = None,
        runtime: str = "torch",
        precision: str = "f32",
    ) -> None:
        from detector.serving.model_store import load_pair
        from detector.threads import set_threads

        set_threads(num_threads)
        pair = load_pair(
            bank_tag,
            backbone_tag,
            runtime=runtime,
            precision=precision,
            device=device,
            num_threads=num_threads,
            batch_size=batch_size,
        )
        self.detector = pair.detector
        self.models = {"backbone": pair.tags.backbone, "bank": pair.tags.bank}
        self.prepare = self.detector.extractor.prepare

    def score(self, batch: list[LoadedImage], with_maps: bool) -> list[Scored]:
        prepared = np.stack([item.prepared for item in batch])
        sizes = [item.image.size for item in batch]
        results = self.detector.predict_prepared(prepared, sizes, with_maps)
        random_weights = self.detector.extractor.random_weights
        scored = []
        for item, result in zip(batch, results, strict=True):
            answer = schema.answer(result.to_dict(), self.models, random_weights)
            answer["drift_profile"] = profile_to_list(result.drift_profile)
            scored.append((schema.row(item.relative_path, answer), result.anomaly_map))
        return scored

    def drift_reference(self) -> np.ndarray:
        return np.asarray(self.detector.calibration.reference_profiles, dtype=np.float32)


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
            httpx.post(f"{self.url}/model_info", headers=self.headers, timeout=30).json()
        except (httpx.HTTPError, ValueError) as error:
            raise BatchSetupError(
                f"No inspection service answers at {self.url}: {error}."
            ) from None
        self._client_class = bentoml.SyncHTTPClient

    def _client(self) -> Any:
        """One BentoML client per worker thread (a client holds one connection pool)."""
        if not hasattr(self.local, "client"):
            self.local.client = self._client_class(self.url, server_ready_timeout=30)
            self.local.client.client.headers.update(self.headers)
        return self.local.client

    def _inspect(self, item: LoadedImage) -> dict[str, Any]:
        from bentoml.exceptions import BentoMLException

        try:
            answer = self._client().inspect(
                image=self.root / item.relative_path, drift_profile=True
            )
        except BentoMLException as error:
            message = f"HTTP {error.error_code.value}: {error}"
            return schema.error_row(item.relative_path, message)
        return schema.row(item.relative_path, answer)

    def _one(self, item: LoadedImage, with_maps: bool) -> Scored:
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
            return schema.error_row(
                item.relative_path, f"HTTP {response.status_code}: {message}"
            ), None
        answer = json.loads(response.headers["x-inspection"])
        return schema.row(item.relative_path, answer), response.content

    def score(self, batch: list[LoadedImage], with_maps: bool) -> list[Scored]:
        return list(self.pool.map(lambda item: self._one(item, with_maps), batch))

    def drift_reference(self) -> np.ndarray:
        """The calibration profiles of the bank the service runs, from its /drift endpoint."""
        import httpx

        response = httpx.post(
            f"{self.url}/drift", json={"reference": True}, headers=self.headers, timeout=60
        )
        response.raise_for_status()
        return np.asarray(response.json().get("reference_profiles", []), dtype=np.float32)
