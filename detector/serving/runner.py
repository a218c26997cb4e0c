"""What the scoring runner does, apart from its BentoML declarations in service.py.

It decodes uploads, scores them through `AnomalyDetector` (the object the batch job and the
evaluator use too) with each product's live bank (`catalog.BankCatalog`), keeps each
product's drift window, and makes new bank versions from added images.

Uploads arrive as their encoded bytes and are decoded here, not in the API: on a CPU machine
the API process competes with the ViT for the same cores, and every millisecond it spent
decoding cost the runner about a millisecond (docs/PERFORMANCE.md). Decoding here also sends
~1 MB per image between the services instead of a 3 MB array.
"""

from __future__ import annotations

import hashlib
import logging
import time
from typing import Any

import numpy as np

from detector.banks import authors, changes, products, versions
from detector.drift import profile_to_list
from detector.errors import UserError
from detector.extractor import FeatureExtractor
from detector.images import InvalidImageError
from detector.scoring import InspectionResult
from detector.serving import telemetry
from detector.serving.answers import Refusal
from detector.serving.catalog import BankCatalog
from detector.serving.fit_jobs import FitJobs
from detector.serving.fit_requests import FitRequest
from detector.serving.inputs import UploadInputs, by_input
from detector.serving.settings import Settings
from detector.traced import TracedBackbone

log = logging.getLogger("inspection")
# (product or "" for the only one, encoded image, explain its flag: a few ms, when asked)
Upload = tuple[str, bytes] | tuple[str, bytes, bool]


def refusal(error: UserError | InvalidImageError) -> dict[str, Any]:
    """A refused upload or change as the runner answers it: {error, reason, status}."""
    return Refusal(error.status, error.reason, str(error)).as_answer()


class ScoringRunner:
    """One extractor, every product's live bank, a decoding pool; answers are plain dicts."""

    def __init__(
        self,
        extractor: FeatureExtractor,
        backbone_tag: str,
        names: list[str],
        settings: Settings,
    ) -> None:
        self.settings = settings
        self.catalog = BankCatalog(extractor, backbone_tag, names, settings)
        for product in names:  # refused by name at start, in the log and the metrics
            try:
                self.catalog.check_fits(products.live_model(product))
            except products.BankUnavailable as error:
                if telemetry.set_bank_unavailable(product, True):
                    log.error("%s: %s", product, error)
        self.info = {
            "backbone_model": backbone_tag,
            "random_weights": extractor.random_weights,
            "extractor": extractor.spec.to_dict(),
            "runtime": settings.runtime,
            "precision": settings.precision,
            # The stored TorchScript trace runs instead of the eager model (detector.traced).
            "backbone_trace": isinstance(extractor, TracedBackbone),
        }
        self.fits = FitJobs(self.catalog, settings)
        self.inputs = UploadInputs(settings)

    # ----- scoring -------------------------------------------------------------------
    def _resolve(self, upload: Upload, live_of: dict[str, Any]) -> str | UserError:
        """The upload's product, its live bank taken once into `live_of` for the whole batch
        (a version made meanwhile may run another backbone: int8 or f32)."""
        try:
            name = self.catalog.resolve(upload[0] or None)
            if name not in live_of:  # a product whose bank cannot be served is refused alone
                live_of[name] = self.catalog.bank(name)
            return name
        except UserError as error:
            return error

    def score_uploads(
        self, uploads: list[Upload], with_maps: bool, watch: bool = True
    ) -> list[dict[str, Any]]:
        """One answer per upload, in order: a result, or {error, reason, status}.

        One backbone pass serves the whole batch whatever products it mixes (the forward
        pass does not depend on the product; only on its tiling, so products tiled alike
        share one); only the k-NN search differs. Maps are made
        at most `heatmap_max_side` long (all the API draws); every answer carries its
        product's drift status, so the API answers /drift without a call here. With
        `watch` off (a recorded image drawn again for review) the drift window is left as
        it is: the line did not make that part again.
        """
        live_of: dict[str, Any] = {}
        names = [self._resolve(upload, live_of) for upload in uploads]
        # Each upload's product's extractor (a tiled product's cuts tiles), or its refusal.
        targets = [
            name if isinstance(name, UserError) else live_of[name].detector.extractor
            for name in names
        ]
        prepared: list[Any] = self.inputs.prepare_each([u[1] for u in uploads], targets)
        good = [i for i, item in enumerate(prepared) if not isinstance(item, Exception)]
        answers: list[dict[str, Any]] = [
            refusal(item) if isinstance(item, Exception) else {} for item in prepared
        ]
        features: dict[int, np.ndarray] = {}
        for same_input in by_input(good, targets).values():
            embed = live_of[names[same_input[0]]].detector.embed_prepared
            grids = embed(np.stack([prepared[i][0] for i in same_input]))
            features.update(zip(same_input, grids, strict=True))
        for product in dict.fromkeys(names[i] for i in good):
            rows = [i for i in good if names[i] == product]
            live = live_of[product]
            sizes = [prepared[i][1] for i in rows]
            results = live.detector.score_features(
                np.stack([features[i] for i in rows]),
                sizes,
                with_maps,
                self.settings.heatmap_max_side,
            )
            drift = self.catalog.drift(product)
            if watch:
                status = drift.add(
                    [r.drift_profile for r in results], [r.is_anomalous for r in results]
                )
                telemetry.publish_drift(product, status)
            else:
                status = drift.status()
            if watch:
                self.catalog.mark_served(live)
            for row, result in zip(rows, results, strict=True):
                answers[row] = self._answer(result, live, status, with_maps)
                if len(uploads[row]) > 2 and uploads[row][2]:
                    answers[row]["explanation"] = live.detector.explain(result, prepared[row][0])
        return answers

    def _answer(
        self, result: InspectionResult, live: Any, drift: dict[str, Any], with_maps: bool
    ) -> dict[str, Any]:
        answer = {
            **result.to_dict(),
            "drift_profile": profile_to_list(result.drift_profile),
            "product": live.product,
            "models": {"backbone": self.catalog.backbone_tag, "bank": live.tag},
            "settings_hash": live.settings_hash,
            "random_weights": self.catalog.extractor.random_weights,
            "demo": live.demo,
            "drift": drift,
        }
        if with_maps:
            answer["anomaly_map"] = result.anomaly_map
        return answer

    # ----- products and bank changes --------------------------------------------------
    def add_images(
        self,
        product: str,
        uploads: list[bytes],
        reason: str,
        calibration: list[bytes],
        records: list[str] | None = None,
        session: str | None = None,
        join: str = "both",
        by: str | None = None,
    ) -> dict[str, Any]:
        """A new bank version that also covers these defect-free images, live here at once
        and in every other worker and replica within INSPECT_BANK_REFRESH_S; `records` are
        the ids of the reviewed records the images came from, kept in the version. Images
        of a later capture `session` join the bank, the calibration or both (`join`)."""
        started = time.perf_counter()
        try:
            product = self.catalog.resolve(product)
            live = self.catalog.bank(product)
            prepared, sizes = self.inputs.prepare_all(
                uploads + calibration,
                live.detector.extractor,  # a tiled product's: tiles
            )
            held_out = (prepared[len(uploads) :], sizes[len(uploads) :]) if calibration else None
            embedding = time.perf_counter()
            # New rows are the shared backbone's features, as the fit's were, never a
            # product's own int8 graph's (its check compares the two against these rows).
            features = self.catalog.reference(live).embed_prepared(prepared[: len(uploads)])
            embedded = time.perf_counter()
            hashes = [hashlib.sha256(data).hexdigest() for data in uploads]
            extractor = self.catalog.extractor
            options = {"reason": reason, "batch_size": self.settings.max_batch_size}
            with authors.acting_as(by):
                if session is not None:
                    model, report = changes.add_session(
                        product, session, features, hashes, extractor, join=join, **options
                    )
                else:
                    model, report = changes.add_images(
                        product,
                        features,
                        hashes,
                        extractor,
                        calibration=held_out,
                        records=records,
                        **options,
                    )
        except (UserError, InvalidImageError) as error:
            return refusal(error)
        self.catalog.install(model)
        timing = {
            "decode": round(embedding - started, 3),
            "backbone": round(embedded - embedding, 3),
            "total": round(time.perf_counter() - started, 3),
        }
        log.info("%s: %s live, %d images added in %s s", product, model.tag, len(uploads), timing)
        return {**report, "timing_s": timing}

    def start_fit(self, request: FitRequest) -> dict[str, Any]:
        """A new product fitted in the background (detector/serving/fit_jobs.py)."""
        try:
            return self.fits.start(request)
        except UserError as error:
            answer = refusal(error)
            if getattr(error, "retry_after", 0):
                answer["retry_after"] = error.retry_after  # type: ignore[attr-defined]
            return answer

    def fit_job(self, product: str, job_id: str, cancel: bool) -> dict[str, Any]:
        try:
            if cancel:
                return self.fits.cancel(product, job_id)
            return self.fits.status(product, job_id)
        except UserError as error:
            return refusal(error)

    def rollback(
        self, product: str, version: str, reason: str, by: str | None = None
    ) -> dict[str, Any]:
        try:
            product = self.catalog.resolve(product)
            with authors.acting_as(by):
                model = versions.rollback(product, version, reason)
            self.catalog.install(model)
        except UserError as error:
            return refusal(error)
        restored = model.info.metadata["change"]["restored"]
        return {"product": product, "version": str(model.tag.version), "restored": restored}

    def set_mask(
        self, product: str, upload: bytes | None, reason: str, by: str | None = None
    ) -> dict[str, Any]:
        """A new version inspecting only where the mask is white (None: everywhere)."""
        try:
            product = self.catalog.resolve(product)
            image = None if upload is None else self.inputs.decode(upload)
            if isinstance(image, InvalidImageError):
                raise image
            with authors.acting_as(by):
                model, report = changes.set_mask(product, image, reason)
            self.catalog.install(model)
        except (UserError, InvalidImageError) as error:
            return refusal(error)
        return report

    def set_threshold(
        self, product: str, change: dict[str, Any], by: str | None = None
    ) -> dict[str, Any]:
        """A new version with a new operating point: {"target": 0.02} or {"threshold": x};
        `confirm` for a threshold far outside the calibration scores."""
        try:
            product = self.catalog.resolve(product)
            with authors.acting_as(by):
                model, report = changes.set_operating_point(
                    product,
                    target=change.get("target"),
                    threshold=change.get("threshold"),
                    reason=str(change.get("reason") or "")[:500],
                    confirm=change.get("confirm") is True,
                    reviewed=change.get("reviewed"),  # from the API's suggestion only
                )
        except UserError as error:
            return refusal(error)
        self.catalog.install(model)
        return report

    def products(self) -> list[dict[str, Any]]:
        """Every product served: its live version, how it was built, and its drift; a
        product whose live bank cannot be served says why instead."""
        self.catalog.rescan()
        loaded = self.catalog.loaded()
        listing = []
        for product in self.catalog.names:
            try:
                model = products.live_model(product)
                self.catalog.check_fits(model)
                described = versions.describe(model)
            except products.BankUnavailable as error:
                listing.append({"name": product, "error": str(error), "reason": error.reason})
                continue
            listing.append(
                {
                    "name": product,
                    **described,
                    # Said before any image is scored: not for a real line.
                    "demo": model.info.labels.get("demo") == "true",
                    "random_weights": self.info["random_weights"],
                    "in_memory": product in loaded,
                    # As served here, where it is loaded (the version states its check).
                    "int8": self.catalog.int8_of(product, described["int8"]),
                    "drift": self.catalog.drift_if_watched(product),
                }
            )
        return listing

    def model_info(self) -> dict[str, Any]:
        """What is served; with one product, also its bank and drift (the API keeps them).
        Where the weights sit on this machine is not said."""
        spec = {key: value for key, value in self.info["extractor"].items() if key != "source"}
        info: dict[str, Any] = {
            **self.info,
            "extractor": spec,
            "products": list(self.catalog.names),
        }
        if len(self.catalog.names) == 1:
            try:
                live = self.catalog.bank(self.catalog.names[0])
            except UserError as error:
                return refusal(error)
            drift = self.catalog.drift(live.product)
            info.update(
                self.catalog.info(live),
                drift=drift.status(),
                drift_reference=drift.reference.tolist(),
            )
        return info

    def drift(self, product: str, reference: bool) -> dict[str, Any]:
        try:
            product = self.catalog.resolve(product or None)
            bank = self.catalog.bank(product)
        except UserError as error:
            return refusal(error)
        monitor = self.catalog.drift(product)
        status = {"product": product, "bank": bank.tag, **monitor.status()}
        if reference:
            status["reference_profiles"] = monitor.reference.tolist()
        return status
