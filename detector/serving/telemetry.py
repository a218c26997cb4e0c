"""Custom Prometheus metrics of the inspection service, next to BentoML's built-in ones.

BentoML runs workers with PROMETHEUS_MULTIPROC_DIR set and serves every worker's samples on
/metrics, so these are plain prometheus_client objects; the gauge says how to merge workers.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import Counter, Gauge, Histogram

from detector.serving.route_rules import PRODUCT_ACTIONS, RECORD_ACTIONS

SCORE_BUCKETS = (0.25, 0.5, 0.75, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0, 3.0, 5.0, float("inf"))

normalized_score = Histogram(
    "inspection_normalized_score",
    "Anomaly score divided by the calibrated threshold (1.0 = threshold)",
    ["product"],
    buckets=SCORE_BUCKETS,
)
# The product label only ever holds names of products in the store (an unknown one is
# refused before it is counted), so the number of series stays bounded.
verdicts = Counter("inspection_verdicts", "Inspected images by verdict", ["product", "verdict"])
rejected_inputs = Counter(
    "inspection_rejected_inputs", "Uploads refused before scoring, by reason", ["reason"]
)
model_info = Gauge(
    "inspection_model_info",
    "Models being served: 1 for each product's live bank, 0 for a version it replaced",
    ["product", "backbone_model", "bank_model", "category", "random_weights"],
    multiprocess_mode="max",
)
# Set by the runner, which sees every scored image; "livemax" keeps one series even when
# the runner is scaled to several workers (each with its own window), and drops dead ones.
drift_window_images = Gauge(
    "inspection_drift_window_images",
    "Images in the drift window",
    ["product"],
    multiprocess_mode="livemax",
)
_drift_statistic: Gauge | None = None
# The drift window's verdicts against the calibration's promise (detector/drift.py): absent
# until the window holds INSPECT_DRIFT_MIN_IMAGES images, like the statistic.
flag_rate = Gauge(
    "inspection_flag_rate",
    "Share of the drift window's images flagged anomalous",
    ["product"],
    multiprocess_mode="livemax",
)
expected_flag_rate = Gauge(
    "inspection_expected_flag_rate",
    "The flagged share the calibration promised (false-alarm rate + expected defect rate)",
    ["product"],
    multiprocess_mode="livemax",
)
flag_rate_p_value = Gauge(
    "inspection_flag_rate_p_value",
    "Binomial test of the window's flagged share against the promised rate (small: too "
    "many flags; the drift status turns drifting below INSPECT_DRIFT_FLAG_ALPHA)",
    ["product"],
    multiprocess_mode="livemin",
)


bank_unavailable = Gauge(
    "inspection_bank_unavailable",
    "1 while a product's live bank version is missing from the model store or its files "
    "fail their check: the product answers 503 until an admin rolls it back",
    ["product"],
    multiprocess_mode="livemax",
)
_unavailable: dict[str, bool] = {}


def set_bank_unavailable(product: str, unavailable: bool) -> bool:
    """Set the gauge; True when this changes what it said (log once, not per request)."""
    changed = _unavailable.get(product, False) != unavailable
    _unavailable[product] = unavailable
    bank_unavailable.labels(product).set(int(unavailable))
    return changed


def drift_statistic() -> Gauge:
    """The drift gauge, created on first use by a runner that has a statistic to report.

    A multiprocess gauge reads 0 in every process that creates it; created at import, the
    API process (and a runner still filling its window) would add a 0 to the max, and
    0 means "exactly like calibration". Until a statistic exists the series is absent.
    """
    global _drift_statistic
    if _drift_statistic is None:
        _drift_statistic = Gauge(
            "inspection_drift_statistic",
            "KS distance between recent images' patch-distance profiles and the calibration "
            "reference (0 = same, 1 = no overlap); absent until the window holds enough images",
            ["product"],
            multiprocess_mode="livemax",
        )
    return _drift_statistic


def publish_model_info(info: dict[str, Any], live: bool = True) -> None:
    """A product's bank as an info series: 1 while it is live, 0 once replaced."""
    model_info.labels(
        info["product"],
        info["backbone_model"],
        info["bank_model"],
        info["category"],
        str(info["random_weights"]).lower(),
    ).set(1 if live else 0)


def publish_drift(product: str, status: dict[str, Any]) -> None:
    """The drift window's size always; the statistic once the window has one; the flagged
    share and its test once the window is long enough."""
    if status["statistic"] is not None:
        drift_statistic().labels(product).set(status["statistic"])
    drift_window_images.labels(product).set(status["images"])
    if status.get("flag_rate_p_value") is not None:
        flag_rate.labels(product).set(status["flag_rate"])
        expected_flag_rate.labels(product).set(status["expected_flag_rate"])
        flag_rate_p_value.labels(product).set(status["flag_rate_p_value"])


load_test_answers = Counter(
    "inspection_load_test_answers",
    "Answers to load-test keys (role loadtest): scored, never recorded, not in the verdict "
    "counts, the score histogram or the drift window",
    ["product"],
)


def count_answer(product: str, result: dict[str, Any]) -> None:
    """A scored image in the score histogram and the verdict counter."""
    if result["normalized_score"] is not None:  # None: a score that was not a number
        normalized_score.labels(product).observe(result["normalized_score"])
    verdicts.labels(product, "anomalous" if result["is_anomalous"] else "normal").inc()


# ----- records and reviews (detector/serving/records.py) ----------------------------------
records = Counter(
    "inspection_records",
    "Inspection records by outcome: written to the database, spooled to disk while it was "
    "unavailable (written later), or dropped (spool full)",
    ["outcome"],
)
reviews = Counter(
    "inspection_reviews",
    "Operator reviews by the record's verdict and the review's label",
    ["product", "verdict", "label"],
)
reviewed_alarms = Gauge(
    "inspection_reviewed_alarms",
    "Flagged records reviewed in the last REVIEW_WINDOW_DAYS days",
    ["product"],
    multiprocess_mode="livemax",
)
review_false_alarm_share = Gauge(
    "inspection_review_false_alarm_share",
    "Share of the flagged records reviewed in the last REVIEW_WINDOW_DAYS days that "
    "operators marked false_alarm: the line's real false-alarm share among alarms",
    ["product"],
    multiprocess_mode="livemax",
)


def publish_reviews(summary: dict[str, dict[str, int]]) -> None:
    """Per product, the reviewed alarms and the false alarms' share of them."""
    for product, counts in summary.items():
        alarms = sum(n for key, n in counts.items() if key.startswith("flagged_"))
        reviewed_alarms.labels(product).set(alarms)
        if alarms:
            share = counts.get("flagged_false_alarm", 0) / alarms
            review_false_alarm_share.labels(product).set(share)


# ----- BentoML's HTTP metrics, one series per route -----------------------------------------
# BentoML labels its request metrics with the raw path: every /records/<id> (and every path
# a scanner tries) would make new series, in every worker's files and in Prometheus, without
# end. These are the paths the service answers; anything else is counted as "other".
ROUTES = frozenset(
    {
        "/inspect",
        "/heatmap",
        "/inspect_batch",
        "/model_info",
        "/drift",
        "/livez",
        "/readyz",
        "/healthz",
        "/metrics",
        "/",
        "/docs.json",
        "/schema.json",
        "/ui/",
        "/products/",
        "/records/",
        "/records/summary",
        # The runner's own API (its paths are fixed by service.py).
        "/score",
        "/score_with_maps",
        "/score_unwatched",
        "/score_with_maps_unwatched",
        "/redraw",
        "/products",
        "/add_images",
        "/rollback",
        "/set_threshold",
    }
)
TEMPLATES = {"products": PRODUCT_ACTIONS, "records": RECORD_ACTIONS}  # the gate's own


def route_template(path: str) -> str:
    """The route a path belongs to: /records/{id}/image for /records/18ec.../image."""
    if path in ROUTES:
        return path
    parts = path.strip("/").split("/")
    if path in ("/ui", "/records"):
        return path + "/"
    name = "{name}" if parts[0] == "products" else "{id}"
    if parts[0] in TEMPLATES and len(parts) == 3 and parts[1] and parts[2] in TEMPLATES[parts[0]]:
        return f"/{parts[0]}/{name}/{parts[2]}"
    if parts[0] == "records" and len(parts) == 2 and parts[1]:
        return "/records/{id}"
    if parts[0] == "products" and len(parts) == 4 and parts[1] and parts[2] == "jobs" and parts[3]:
        return "/products/{name}/jobs/{job}"
    return "other"


def bounded_http_metrics() -> None:
    """Have BentoML label its HTTP metrics by `route_template`; the request itself keeps its
    path. BentoML builds its metrics middleware when the service's app is made, after this
    module is imported (service.py calls this in every process)."""
    from bentoml._internal.server.http import instruments

    original = instruments.RunnerTrafficMetricsMiddleware
    if getattr(original, "bounded", False):
        return

    class RouteMetricsMiddleware(original):  # type: ignore[misc, valid-type]
        bounded = True

        def __init__(self, app: Any, *args: Any, **kwargs: Any) -> None:
            async def with_its_path(scope: Any, receive: Any, send: Any) -> None:
                if "inspection.path" in scope:  # not in lifespan scopes, which have no path
                    scope["path"] = scope.pop("inspection.path")
                await app(scope, receive, send)

            super().__init__(with_its_path, *args, **kwargs)

        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            if scope["type"].startswith("http") and scope["path"] != "/metrics":
                path = scope["path"]
                scope = {**scope, "path": route_template(path), "inspection.path": path}
            await super().__call__(scope, receive, send)

    instruments.RunnerTrafficMetricsMiddleware = RouteMetricsMiddleware
