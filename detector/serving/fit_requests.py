"""What a new product's fit request (`POST /products`) must be, checked on the runner
before any work starts, so every refusal is an answer to the request, never a failed job."""

from __future__ import annotations

from dataclasses import dataclass

from detector.banks import changes, products
from detector.errors import UserError
from detector.images import InvalidImageError, check_image_header
from detector.serving.settings import Settings
from detector.sessions import SESSION_NAME

MIN_FIT_IMAGES = 5  # five folds: each image is scored by a bank of the others


class FitRefused(UserError):
    """A fit request refused before any work: `status`, `reason` and a sentence."""

    def __init__(self, status: int, reason: str, message: str, retry_after: int = 0) -> None:
        super().__init__(message)
        self.status, self.reason, self.retry_after = status, reason, retry_after


@dataclass(frozen=True)
class FitRequest:
    """What `POST /products` asks for; `sessions` is empty or names each image's session."""

    product: str
    uploads: list[bytes]
    sessions: list[str]
    target: float = 0.01
    coreset_ratio: float | None = None  # None: the fit config's default (BankConfig)
    reason: str = ""
    requested_by: str | None = None  # the API key's name, never the key


def check_request(request: FitRequest, settings: Settings, pinned: bool) -> None:
    """Every refusal that needs no decoding: the name, the store, the images' count,
    sessions, options and headers (one size for all)."""
    product = products.check_product(request.product)
    if pinned:
        raise FitRefused(
            409,
            "products_pinned",
            "This server serves only the products in INSPECT_PRODUCTS, so a new product "
            "would not be served here: fit it on a server without INSPECT_PRODUCTS.",
        )
    if product_exists(product):
        raise changes.ProductExistsError(product)
    count = len(request.uploads)
    if count < MIN_FIT_IMAGES:
        raise FitRefused(
            400,
            "too_few_images",
            f"{count} image(s) sent; a new product needs at least {MIN_FIT_IMAGES} "
            "defect-free images (each is scored by a bank of the others to set the "
            "threshold), and a 1 % promise needs about 299 from 2 capture sessions.",
        )
    check_sessions(request.sessions, count)
    if not 0.0 < request.target <= 0.5:
        raise FitRefused(400, "bad_request", "target is a false-alarm rate in (0, 0.5].")
    ratio = request.coreset_ratio
    if ratio is not None and not 0.0 < ratio <= 1.0:
        raise FitRefused(400, "bad_request", "coreset_ratio is a share of rows in (0, 1].")
    check_one_size([header(data, index, settings) for index, data in enumerate(request.uploads)])


def header(data: bytes, index: int, settings: Settings) -> tuple[int, int]:
    """One image's (width, height) from its header, with the service's limits."""
    try:
        return check_image_header(
            data, max_bytes=settings.max_bytes, max_pixels=settings.max_pixels
        )
    except InvalidImageError as error:
        raise FitRefused(error.status, error.reason, f"Image {index + 1}: {error}") from None


def check_one_size(sizes: list[tuple[int, int]]) -> None:
    """One product's images come from one camera setup: one size."""
    if len(set(sizes)) > 1:
        counts = {size: sizes.count(size) for size in dict.fromkeys(sizes)}
        said = ", ".join(f"{w} x {h} ({n})" for (w, h), n in counts.items())
        raise FitRefused(
            400,
            "mixed_sizes",
            f"The images have different sizes: {said}. Send images of one camera "
            "setup: one product's images share a size.",
        )


def check_sessions(sessions: list[str], count: int) -> None:
    """None, or one valid session name per image."""
    if not sessions:
        return
    if len(sessions) != count:
        raise FitRefused(
            400,
            "bad_sessions",
            f"{len(sessions)} sessions for {count} images: name one session per image, or none.",
        )
    for name in sessions:
        if not SESSION_NAME.match(name):
            raise FitRefused(
                400,
                "bad_sessions",
                f"Session {name[:64]!r} is not a valid name: letters, digits, '-', '_' or '.'.",
            )


def product_exists(product: str) -> bool:
    try:
        return products.live_version(product) is not None
    except products.LiveVersionMissing:
        return True
