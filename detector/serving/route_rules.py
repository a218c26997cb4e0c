"""What each route accepts, and from whom: the gate's rules, keyed by route
(`rule_key` maps a path under /products or /records to its rule)."""

from __future__ import annotations

from dataclasses import dataclass

from detector.serving.settings import Settings

SMALL_BODY = 64 * 1024  # JSON bodies of /drift, /model_info
MULTIPART_OVERHEAD = 64 * 1024  # boundaries, part headers and text fields around one file
JSON, MULTIPART = "application/json", "multipart/form-data"


@dataclass(frozen=True)
class Rule:
    """What one route accepts, and from whom."""

    max_body: int
    role: str  # line | reviewer | admin (detector/serving/access.py)
    body: str | None = None  # the one content type a request body may have
    file_fields: frozenset[str] = frozenset()  # multipart fields that must be file uploads
    text_fields: frozenset[str] = frozenset()  # and the only other fields a body may carry
    max_files: int | None = None
    queued: bool = False  # counts against INSPECT_MAX_QUEUE (it waits for the runner)
    # At most this many of these requests at once (the rest: 503), so a flood of them
    # cannot take the whole queue from inspection.
    max_at_once: int | None = None


PRODUCT_ACTIONS = ("history", "rollback", "images", "threshold", "suggestion", "mask")
RECORD_ACTIONS = ("image", "heatmap", "explanation", "review")


def rules(settings: Settings) -> dict[str, Rule]:
    one_image = settings.max_bytes + MULTIPART_OVERHEAD
    image = frozenset({"image"})
    return {
        "/inspect": Rule(
            one_image,
            "line",
            MULTIPART,
            image,
            frozenset({"product", "drift_profile", "explain"}),
            max_files=1,
            queued=True,
        ),
        "/heatmap": Rule(
            one_image,
            "line",
            MULTIPART,
            image,
            frozenset({"product", "output", "drift_profile", "explain"}),
            max_files=1,
            queued=True,
        ),
        "/inspect_batch": Rule(
            settings.max_batch_bytes + MULTIPART_OVERHEAD,
            "line",
            MULTIPART,
            frozenset({"images"}),
            frozenset({"product"}),
            max_files=settings.max_batch_files,
            queued=True,
        ),
        "/drift": Rule(SMALL_BODY, "line", JSON),
        "/model_info": Rule(SMALL_BODY, "line", JSON),
        **product_rules(settings),
        "/records/": Rule(SMALL_BODY, "reviewer"),
        "/records/summary": Rule(SMALL_BODY, "reviewer"),
        "/records/activity": Rule(SMALL_BODY, "reviewer", max_at_once=2),
        "/records/*": Rule(SMALL_BODY, "reviewer"),
        "/records/*/image": Rule(SMALL_BODY, "reviewer"),
        "/records/*/heatmap": Rule(
            SMALL_BODY, "reviewer", queued=True, max_at_once=settings.max_renders
        ),
        # Drawn with the heatmap by one redraw, and kept with it.
        "/records/*/explanation": Rule(
            SMALL_BODY, "reviewer", queued=True, max_at_once=settings.max_renders
        ),
        "/records/*/review": Rule(SMALL_BODY, "reviewer", JSON),
        "/records/**": Rule(SMALL_BODY, "reviewer", JSON),
    }


def product_rules(settings: Settings) -> dict[str, Rule]:
    """The rules of /products: the listing the line's, changes an admin's."""
    return {
        "/products/": Rule(SMALL_BODY, "line"),
        # A new product: one fit's upload at a time (the runner fits one at a time too).
        "POST /products/": Rule(
            settings.max_change_bytes + MULTIPART_OVERHEAD,
            "admin",
            MULTIPART,
            frozenset({"images"}),
            frozenset({"name", "sessions", "target", "coreset_ratio", "resolution", "reason"}),
            max_files=settings.max_batch_files,
            max_at_once=1,
        ),
        "/products/*/jobs/*": Rule(SMALL_BODY, "admin"),
        "/products/*/history": Rule(SMALL_BODY, "reviewer"),
        "/products/*/suggestion": Rule(SMALL_BODY, "reviewer"),
        "/products/*/rollback": Rule(SMALL_BODY, "admin", JSON),
        "/products/*/threshold": Rule(SMALL_BODY, "admin", JSON),
        # PUT: a mask image (white = inspect) and a reason; DELETE: inspect everything again.
        "/products/*/mask": Rule(
            settings.max_bytes + MULTIPART_OVERHEAD,
            "admin",
            MULTIPART,
            frozenset({"mask"}),
            frozenset({"reason"}),
            max_files=1,
            queued=True,
        ),
        "/products/*/images": Rule(
            settings.max_change_bytes + MULTIPART_OVERHEAD,
            "admin",
            MULTIPART,
            frozenset({"images", "calibration_images"}),
            frozenset({"reason", "records", "session", "join"}),
            max_files=settings.max_batch_files,
            queued=True,
        ),
        # Anything else under /products: the strictest rule (then a 404 from the route).
        "/products/**": Rule(SMALL_BODY, "admin", JSON),
    }


MOUNTED = {"/products": PRODUCT_ACTIONS, "/records": RECORD_ACTIONS}


def rule_for(table: dict[str, Rule], method: str, path: str) -> Rule | None:
    """A path's rule; one for its method first ("POST /products/": a new product is an
    admin's, the listing the line's)."""
    key = rule_key(path)
    return table.get(f"{method} {key}") or table.get(key)


def rule_key(path: str) -> str:
    """The rules' key for a path. Under a mounted app (/products, /records), PREFIX/NAME/ACTION
    matches PREFIX/*/ACTION, /records/ID matches /records/*, the root the listing, and any
    other path under it (a typo, a path trick) PREFIX/**, so nothing under it is reached
    without the key."""
    prefix = "/" + path.split("/")[1] if path.count("/") >= 1 else path
    actions = MOUNTED.get(prefix)
    if actions is None or (path != prefix and not path.startswith(prefix + "/")):
        return path
    if path in (prefix, prefix + "/"):
        return prefix + "/"
    parts = path.split("/")
    if len(parts) == 4 and parts[2] and parts[3] in actions:
        return f"{prefix}/*/{parts[3]}"
    if len(parts) == 5 and prefix == "/products" and parts[2] and parts[3] == "jobs" and parts[4]:
        return "/products/*/jobs/*"
    if len(parts) == 3 and parts[2] and prefix == "/records":
        return f"/records/{parts[2]}" if parts[2] in ("summary", "activity") else "/records/*"
    return f"{prefix}/**"
