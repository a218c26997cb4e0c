"""The runner's products: one shared feature extractor, each product's live bank in memory.

Banks load on first use and stay up to a memory budget (`INSPECT_BANK_CACHE_MB`, least
recently used evicted first). A product's live version is checked at most every
`INSPECT_BANK_REFRESH_S` seconds by reading one small file the store keeps
(`products.live_version`), so a version made by another worker, replica or command is served
within that time plus its load, with no restart: the new detector is built beside the old
one and swapped in one assignment, so no request ever sees half a bank.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bentoml
import numpy as np

from detector.anomaly_detector import AnomalyDetector
from detector.banks import products, versions
from detector.drift import DriftMonitor
from detector.extractor import BackboneSpec, FeatureExtractor, IncompatibleBankError
from detector.memory_bank import INDEX_FILE
from detector.quantized import product_extractor
from detector.serving import telemetry
from detector.serving.settings import Settings

log = logging.getLogger("inspection")


@dataclass(frozen=True)
class LiveBank:
    product: str
    version: str
    tag: str
    detector: AnomalyDetector
    nbytes: int
    settings_hash: str  # what decided besides the rows (AnomalyDetector.settings_hash)
    int8: dict[str, Any] | None = None  # detector.quantized.status, as served here

    @property
    def demo(self) -> bool:
        return bool(self.detector.bank.metadata.get("demo", False))

    @property
    def category(self) -> str:
        return str(self.detector.bank.metadata.get("category", "unknown"))


class BankCatalog:
    """Products served by one runner; thread-safe, so any worker thread may score."""

    def __init__(
        self,
        extractor: FeatureExtractor,
        backbone_tag: str,
        names: list[str],
        settings: Settings,
    ) -> None:
        self.extractor = extractor
        self.backbone_tag = backbone_tag
        self.settings = settings
        self.names = list(names)
        self._pinned = bool(settings.products)  # INSPECT_PRODUCTS: no others are served
        self._live: OrderedDict[str, LiveBank] = OrderedDict()
        self._checked: dict[str, float] = {}
        self._drift: dict[str, DriftMonitor] = {}
        self._references: dict[str, list[list[float]]] = {}
        self._rescanned = 0.0
        self._served: set[str] = set()
        self._lock = threading.RLock()

    # ----- names ---------------------------------------------------------------------
    @property
    def pinned(self) -> bool:
        """INSPECT_PRODUCTS names every product served: no others join."""
        return self._pinned

    def resolve(self, name: str | None) -> str:
        """The product a request means: the named one, or the only one when none is named."""
        if not name:
            if len(self.names) == 1:
                return self.names[0]
            raise products.UnknownProductError(None, self.names)
        if name not in self.names and not self._pinned:
            self.rescan()
        if name not in self.names:
            raise products.UnknownProductError(name, self.names)
        return name

    def rescan(self) -> None:
        """Products exported since start join without a restart (at most once a second)."""
        with self._lock:
            if self._pinned or time.monotonic() - self._rescanned < 1.0:
                return
            self._rescanned = time.monotonic()
            self.names = sorted(set(self.names) | set(products.list_products()))

    # ----- banks ---------------------------------------------------------------------
    def bank(self, product: str) -> LiveBank:
        """The product's live bank, loaded or refreshed if its version changed."""
        with self._lock:
            live = self._live.get(product)
            now = time.monotonic()
            if (
                live is not None
                and now - self._checked.get(product, 0) < self.settings.bank_refresh_s
            ):
                self._live.move_to_end(product)
                return live
            self._checked[product] = now
            try:
                version = products.live_version(product)
                if live is not None and live.version == version:
                    self._live.move_to_end(product)
                    return live
                if version is None:
                    raise products.UnknownProductError(product, self.names)
                return self.install(products.version_model(product, version))
            except products.BankUnavailable as error:
                # Never another bank in its place: the product answers 503 until fixed.
                self._live.pop(product, None)
                self._checked.pop(product, None)
                if telemetry.set_bank_unavailable(product, True):
                    log.error("%s: %s", product, error)
                raise

    def check_fits(self, model: bentoml.Model) -> None:
        """Raise BankIncompatible unless the served backbone gives this bank's features (a
        product exported later, or fitted with other weights, layers or resolution)."""
        product = str(model.info.metadata.get("product", model.tag.name))
        fitted = BackboneSpec.from_dict(model.info.metadata["extractor"])
        served = self.extractor.spec
        try:
            fitted.check_compatible(served)
            if (tuple(fitted.layers), fitted.resolution) != (
                tuple(served.layers),
                served.resolution,
            ):
                raise IncompatibleBankError(
                    f"layers {list(fitted.layers)} at {fitted.resolution} px vs "
                    f"{list(served.layers)} at {served.resolution} px"
                )
        except IncompatibleBankError as error:
            raise products.BankIncompatible(
                f"{product} ({model.tag}) was fitted with backbone {fitted.source!r}, not the "
                f"one this server runs ({self.backbone_tag}): {error} The other products are "
                f"served. Refit {product} with the served backbone, or serve it from its own "
                "store or server (INSPECT_PRODUCTS)."
            ) from None

    def install(self, model: bentoml.Model) -> LiveBank:
        """Serve this bank version of its product from now on (after an update here)."""
        self.check_fits(model)
        product = str(model.info.metadata["product"])
        bank = versions.load_bank(model)
        # A product that asked for int8 runs its own graph when its check holds (a pass of
        # its own), else the shared backbone, with a log line saying why.
        extractor, int8 = product_extractor(
            Path(model.path),
            bank.metadata,
            bank.size,
            self.extractor,
            self.settings.num_threads,
            product,
            log,
        )
        detector = AnomalyDetector.from_bank(bank, extractor, self.settings.max_batch_size)
        live = LiveBank(
            product,
            str(model.tag.version),
            str(model.tag),
            detector,
            # What the bank cache weighs: the rows, and their crops for explanations.
            os.path.getsize(Path(model.path) / INDEX_FILE)
            + (bank.provenance.nbytes if bank.provenance is not None else 0),
            detector.settings_hash(
                runtime=self.settings.runtime, precision=self.settings.precision
            ),
            int8,
        )
        with self._lock:
            old = self._live.pop(product, None)
            self._live[product] = live
            self._checked[product] = time.monotonic()
            if product not in self.names:
                self.names = sorted([*self.names, product])
            self._keep_drift(product, detector)
            self._evict()
        telemetry.set_bank_unavailable(product, False)
        if old is not None:
            telemetry.publish_model_info(self.info(old), live=False)
            log.info("%s: now serving %s (was %s)", product, live.tag, old.tag)
        telemetry.publish_model_info(self.info(live))
        return live

    def _keep_drift(self, product: str, detector: AnomalyDetector) -> None:
        """One drift window per product; a new reference (a recalibration) starts it afresh."""
        reference = detector.calibration.reference_profiles
        if product in self._drift and self._references.get(product) == reference:
            # The same reference, perhaps another threshold: the promise follows the version.
            self._drift[product].new_operating_point(detector.calibration.promised_rate)
            return
        self._references[product] = reference
        self._drift[product] = DriftMonitor(
            np.asarray(reference),
            self.settings.drift,
            promised_rate=detector.calibration.promised_rate,
        )
        if not reference:
            log.warning(
                "%s: the bank has no drift reference: refit it, or set one with "
                "`python -m detector set-drift-reference`",
                product,
            )

    def _evict(self) -> None:
        budget = self.settings.bank_cache_mb << 20
        while len(self._live) > 1 and sum(b.nbytes for b in self._live.values()) > budget:
            product, evicted = self._live.popitem(last=False)
            self._checked.pop(product, None)
            log.info(
                "%s: bank %s evicted from memory (INSPECT_BANK_CACHE_MB)", product, evicted.tag
            )

    def mark_served(self, live: LiveBank) -> None:
        """The first image a version scores here marks it kept by retention: its records
        name it (products.mark_served)."""
        if live.tag not in self._served:
            products.mark_served(live.product, live.version)
            self._served.add(live.tag)

    def drift(self, product: str) -> DriftMonitor:
        with self._lock:
            if product not in self._drift:
                self.bank(product)
            return self._drift[product]

    def drift_if_watched(self, product: str) -> dict[str, Any] | None:
        """A product's drift status, or None before its bank was first used (listing the
        products must not load every bank)."""
        with self._lock:
            monitor = self._drift.get(product)
            return monitor.status() if monitor is not None else None

    def reference(self, live: LiveBank) -> AnomalyDetector:
        """The live detector on the shared backbone: itself, unless an int8 graph serves it."""
        detector = live.detector
        if live.int8 is None or live.int8["served"] != "int8":
            return detector
        return AnomalyDetector(
            self.extractor,
            detector.bank,
            detector.calibration,
            detector.scoring,
            detector.batch_size,
        )

    def int8_of(self, product: str, stated: dict[str, Any] | None) -> dict[str, Any] | None:
        """A product's int8 status as its loaded bank is served, else as its version says."""
        with self._lock:
            live = self._live.get(product)
        return live.int8 if live is not None else stated

    def loaded(self) -> list[str]:
        with self._lock:
            return list(self._live)

    def info(self, live: LiveBank) -> dict[str, Any]:
        """What answers and /metrics say about the bank that decided."""
        return {
            "product": live.product,
            "backbone_model": self.backbone_tag,
            "bank_model": live.tag,
            "category": live.category,
            "random_weights": self.extractor.random_weights,
            "demo": live.demo,
            "threshold": live.detector.calibration.threshold,
        }
