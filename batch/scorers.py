"""Where the batch job's scores come from: the detector in-process, or a live service.

In-process, the job loads the model pair from the BentoML store (`load_pair`: the same
stored models and checks as the service's runner) and scores through the same
`AnomalyDetector`. With `--url`, each
image goes to a running service's /inspect (or /heatmap) endpoint instead. Either way a
result becomes a journal row through `detector.schema`, so the rows look alike.
"""

from __future__ import annotations

import json
import time
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


class OutputBusyError(BatchSetupError):
    """Another job holds OUT's lock: not this job's fault, and worth retrying (a pod that
    replaces one still terminating), so it has an exit code of its own."""


class Scorer(Protocol):
    """What the job needs from a source of scores."""

    models: dict[str, str]  # {"backbone": tag, "bank": tag}: what a resumed row must match
    promised_rate: float | None  # the calibration's false-alarm rate, for the drift report
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
        product: str | None,
        bank_tag: str | None,
        backbone_tag: str | None,
        batch_size: int,
        device: str = "auto",
        num_threads: int | None = None,
        runtime: str = "torch",
        precision: str = "f32",
        heatmap_max_side: int = 2048,
    ) -> None:
        from detector.banks.models import load_pair
        from detector.threads import set_threads

        set_threads(num_threads)
        pair = load_pair(
            bank_tag,
            backbone_tag,
            product=product,
            runtime=runtime,
            precision=precision,
            device=device,
            num_threads=num_threads,
            batch_size=batch_size,
        )
        self.detector = pair.detector
        self.models = {"backbone": pair.tags.backbone, "bank": pair.tags.bank}
        # What a record of this run's decisions names (batch --record).
        self.product = pair.product or str(
            self.detector.bank.metadata.get("product") or product or ""
        )
        self.settings_hash = self.detector.settings_hash(runtime=runtime, precision=precision)
        self.prepare = self.detector.extractor.prepare
        self.heatmap_max_side = heatmap_max_side
        self.promised_rate: float | None = self.detector.calibration.promised_rate

    def score(self, batch: list[LoadedImage], with_maps: bool) -> list[Scored]:
        prepared = np.stack([item.prepared for item in batch])
        sizes = [item.image.size for item in batch]
        results = self.detector.predict_prepared(prepared, sizes, with_maps, self.heatmap_max_side)
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
    """Sends images to a running inspection service, several at a time so it can batch.

    A request that times out, loses its connection or meets a busy service (502/503/504) is
    tried again with backoff; after the last try the file gets an error row, never a
    traceback. A refusal of the file itself (4xx) is recorded at once.
    """

    prepare = None
    promised_rate: float | None = None  # from the service's /drift, with the reference
    RETRIED_STATUSES = (502, 503, 504)

    def __init__(
        self,
        url: str,
        root: Path,
        concurrency: int,
        api_key: str | None,
        timeout: float = 120.0,
        attempts: int = 4,
        backoff_s: float = 1.0,
        product: str | None = None,
    ) -> None:
        import httpx

        self.url, self.root = url.rstrip("/"), root
        self.product = product or ""
        self.attempts, self.backoff_s = max(1, attempts), backoff_s
        headers = {"X-API-Key": api_key} if api_key else {}
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        self.client = httpx.Client(headers=headers, timeout=timeout, limits=limits)
        self.pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="client")
        info = self._setup_call("/model_info")
        bank = info.get("bank_model", "") if not product else ""
        if not bank:  # several products, or one named: its live version
            listing = self._setup_call("/products", method="GET")
            named = [entry for entry in listing if entry["name"] == (product or "")]
            if not named:
                known = ", ".join(entry["name"] for entry in listing)
                raise BatchSetupError(
                    f"Name one of the service's products with --product: {known}."
                )
            bank = named[0]["tag"]
        self.models = {"backbone": info.get("backbone_model", ""), "bank": bank}

    def _setup_call(self, endpoint: str, method: str = "POST", **body: Any) -> Any:
        import httpx

        try:
            if method == "GET":
                response = self.client.get(f"{self.url}{endpoint}")
            else:
                response = self.client.post(f"{self.url}{endpoint}", json=body)
        except httpx.HTTPError as error:
            raise BatchSetupError(
                f"No inspection service answers at {self.url}: {error}."
            ) from None
        if response.status_code == 401:
            raise BatchSetupError(
                f"{self.url} refused the API key: pass --api-key (or set INSPECT_API_KEY)."
            )
        if response.status_code != 200:
            raise BatchSetupError(f"{self.url}{endpoint} answered HTTP {response.status_code}.")
        return response.json()

    def _post(self, item: LoadedImage, with_maps: bool) -> Any:
        """The service's response for one file, after retries; raises the last failure."""
        import httpx

        path = self.root / item.relative_path
        files = {"image": (path.name, path.read_bytes(), "application/octet-stream")}
        endpoint = f"{self.url}/heatmap" if with_maps else f"{self.url}/inspect"
        last = self.attempts - 1
        for attempt in range(self.attempts):
            wait = self.backoff_s * 2**attempt
            try:
                form = {"drift_profile": "true", "product": self.product}
                response = self.client.post(endpoint, files=files, data=form)
            except httpx.TransportError:  # timeouts, refused or dropped connections
                if attempt == last:
                    raise
            else:
                if response.status_code not in self.RETRIED_STATUSES or attempt == last:
                    return response
                retry_after = response.headers.get("retry-after", "")
                wait = max(wait, float(retry_after)) if retry_after.isdigit() else wait
            time.sleep(wait)
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _one(self, item: LoadedImage, with_maps: bool) -> Scored:
        import httpx

        try:
            response = self._post(item, with_maps)
        except (httpx.HTTPError, OSError) as error:
            message = f"{type(error).__name__} after {self.attempts} tries: {error}"
            return schema.error_row(item.relative_path, message), None
        if response.status_code != 200:
            try:
                message = response.json().get("error", response.text)
            except ValueError:
                message = response.text
            row = schema.error_row(item.relative_path, f"HTTP {response.status_code}: {message}")
            return row, None
        if with_maps:
            answer = json.loads(response.headers["x-inspection"])
            return schema.row(item.relative_path, answer), response.content
        return schema.row(item.relative_path, response.json()), None

    def score(self, batch: list[LoadedImage], with_maps: bool) -> list[Scored]:
        return list(self.pool.map(lambda item: self._one(item, with_maps), batch))

    def drift_reference(self) -> np.ndarray:
        """The calibration profiles of the bank the service runs, from its /drift endpoint."""
        drift = self._setup_call("/drift", reference=True, product=self.product)
        self.promised_rate = drift.get("promised_rate")
        profiles = drift.get("reference_profiles", [])
        return np.asarray(profiles, dtype=np.float32)
