"""Products in the BentoML model store, and where each one's versions live.

A product (`carpet`, `line3-grey`) is the BentoML model `bank-<product>`; its versions are
`v1`, `v2`, ... (`detector.banks.versions` makes, describes and restores them). Here: the
names, the live pointer, the per-product lock, the version counter and retention.

- After a version is complete, its number is written to `<store>/bank-<product>/live`
  (atomically): readers poll that one small file, and never see a half-copied version.
- Writers take a per-product file lock (every worker and every replica sharing the store),
  so two concurrent updates both land, one on top of the other.
- Version numbers come from a counter (`<store>/bank-<product>/counter`) and are never
  reused, so a record's `bank-x:v6` names one bank forever.
- A live version that disappears makes its product answer 503 (`LiveVersionMissing`), never
  quietly fall back to an older bank.
- Old versions are removed beyond `INSPECT_KEEP_VERSIONS` (20) unless the live pointer or a
  rollback names them, or they scored something (`mark_served`), which records may name.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from contextlib import AbstractContextManager, suppress
from pathlib import Path

import bentoml

from detector.banks.location import model_store_dir
from detector.environment import env_int
from detector.errors import UserError
from detector.files import exclusive, write_atomic

log = logging.getLogger("inspection")
model_store_dir()  # before any bentoml.models call in this process: BentoML uses it too
BANK_PREFIX = "bank-"
LIVE_FILE = "live"
LOCK_FILE = ".update.lock"
COUNTER_FILE = "counter"
KEEP_FILE = "keep"  # versions retention keeps: they served, or a rollback restored them
PRODUCT_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,57}$")
VERSION_NAME = re.compile(r"^v([1-9][0-9]{0,8})$")
DEFAULT_KEEP_VERSIONS = 20


class UnknownProductError(UserError):
    """A product no bank exists for; HTTP 404 with the known names."""

    def __init__(
        self, name: str | None, known: list[str], how: str = "form field 'product'"
    ) -> None:
        listed = (
            ", ".join(known) or "none yet: export a fitted bank with `python -m detector export`"
        )
        if name is None:
            message = f"Name the product ({how}); known products: {listed}."
        else:
            message = f"Unknown product {name!r}; known products: {listed}."
        super().__init__(message)
        self.name, self.known = name, known
        # Several products served and none named is the request's gap, not a lookup miss.
        self.status, self.reason = (
            (400, "product_required") if name is None else (404, "unknown_product")
        )


class VersionError(UserError):
    """A bank version that does not exist (HTTP 404)."""

    status, reason = 404, "unknown_version"


class BankUnavailable(UserError):
    """A product whose live bank cannot be served as it is (HTTP 503, and an alert)."""

    status, reason = 503, "bank_unavailable"


class LiveVersionMissing(BankUnavailable):
    reason = "bank_missing"


class BankCorrupt(BankUnavailable):
    reason = "bank_corrupt"


class BankIncompatible(BankUnavailable):
    """Fitted with another backbone (or layers, resolution) than the one this server runs:
    its features would not be the bank's. The other products are served."""

    reason = "bank_incompatible"


def check_product(name: str) -> str:
    if not isinstance(name, str) or not PRODUCT_NAME.match(name):
        shown = (
            repr(name[:64]) + ("..." if len(name) > 64 else "") if isinstance(name, str) else "?"
        )
        raise UserError(
            f"Product name {shown} is not valid: use lowercase letters, digits, '-', '_' or "
            "'.', starting with a letter or digit, at most 58 characters."
        )
    return name


def model_name(product: str) -> str:
    return BANK_PREFIX + check_product(product)


def store_dir() -> Path:
    """The model store folder: a shared one, a Bento's packed models, or BENTOML_HOME's
    (detector/banks/location.py)."""
    return model_store_dir()


def product_dir(product: str) -> Path:
    return store_dir() / model_name(product)


def version_numbers(product: str) -> list[int]:
    """Version numbers whose model is complete (model.yaml is written last)."""
    folder = product_dir(product)
    if not folder.is_dir():
        return []
    found = (VERSION_NAME.match(entry.name) for entry in folder.iterdir() if entry.is_dir())
    return sorted(
        int(match.group(1))
        for match in found
        if match and (folder / match.group(0) / "model.yaml").exists()
    )


def list_products() -> list[str]:
    """Every product with at least one complete bank version in the store."""
    root = store_dir()
    if not root.is_dir():
        return []
    names = (
        entry.name.removeprefix(BANK_PREFIX)
        for entry in root.iterdir()
        if entry.name.startswith(BANK_PREFIX)
    )
    return sorted(name for name in names if PRODUCT_NAME.match(name) and version_numbers(name))


def live_version(product: str) -> str | None:
    """'vN' of the live version: the pointer file, or (before any pointer was written) the
    newest complete version. A pointer to a version that is gone raises
    `LiveVersionMissing`: serving another bank instead would change every verdict unseen."""
    folder = product_dir(product)
    try:
        version = (folder / LIVE_FILE).read_text().strip()
    except OSError:
        numbers = version_numbers(product)
        return f"v{numbers[-1]}" if numbers else None
    if VERSION_NAME.match(version) and (folder / version / "model.yaml").exists():
        return version
    raise LiveVersionMissing(
        f"{model_name(product)}:{version[:24]} is the live version but is missing from the "
        f"model store: roll {product} back to a version that exists (`python -m detector "
        f"rollback {product} vN`, or POST /products/{product}/rollback)."
    )


def live_model(product: str) -> bentoml.Model:
    version = live_version(product)
    if version is None:
        raise UnknownProductError(product, list_products())
    return bentoml.models.get(f"{model_name(product)}:{version}")


def version_model(product: str, version: str | int) -> bentoml.Model:
    text = str(version)
    version = f"v{text}" if text.isascii() and text.isdigit() else text
    match = VERSION_NAME.match(version)
    if not match or int(match.group(1)) not in version_numbers(product):
        known = ", ".join(f"v{n}" for n in version_numbers(product)) or "none"
        shown = version[:24] + ("..." if len(version) > 24 else "")
        raise VersionError(f"{product} has no bank version {shown!r}; versions: {known}.")
    return bentoml.models.get(f"{model_name(product)}:{version}")


def product_lock(product: str) -> AbstractContextManager[None]:
    """One writer per product across processes and replicas that share the store."""
    return exclusive(product_dir(product) / LOCK_FILE)


def write_live(product: str, version: str) -> None:
    write_atomic(product_dir(product) / LIVE_FILE, version + "\n")


def next_number(product: str) -> int:
    """The next version number, never one used before (call under the product's lock)."""
    folder = product_dir(product)
    try:
        counted = int((folder / COUNTER_FILE).read_text().strip())
    except (OSError, ValueError):
        counted = 0
    numbers = version_numbers(product)
    number = max(counted, numbers[-1] if numbers else 0) + 1
    write_atomic(folder / COUNTER_FILE, f"{number}\n")
    return number


def mark_served(product: str, version: str) -> None:
    """Note that a version scored something (and records may name it): retention keeps it.
    A version a rollback restored is kept the same way (a known good bank)."""
    folder = product_dir(product)
    try:
        if version in (folder / KEEP_FILE).read_text().split():
            return
    except OSError:
        pass
    with open(folder / KEEP_FILE, "a") as handle:  # one short append: atomic enough
        handle.write(version + "\n")


def keep_versions() -> int:
    return env_int("INSPECT_KEEP_VERSIONS", DEFAULT_KEEP_VERSIONS) or DEFAULT_KEEP_VERSIONS


def _remove_version(path: Path) -> None:
    """Delete an old version's folder: renamed away first, so no reader ever sees half of
    it. (`bentoml.models.delete` reads every version of the model to do the same: 0.5 s a
    version at 400 versions.) Never the newest version, so BentoML's `latest` stays true."""
    gone = path.with_name(f".removing-{path.name}-{os.getpid()}")
    os.replace(path, gone)
    shutil.rmtree(gone, ignore_errors=True)


def prune_versions(product: str, keep: int | None = None) -> list[str]:
    """Remove versions beyond the newest `keep`, except the live one and those `mark_served`
    kept (they scored, so records may name them, or a rollback restored them). Call under
    the product's lock."""
    keep = keep_versions() if keep is None else keep
    numbers = version_numbers(product)
    if len(numbers) <= keep:
        return []
    folder = product_dir(product)
    try:
        protected = set((folder / KEEP_FILE).read_text().split())
    except OSError:
        protected = set()
    with suppress(LiveVersionMissing):
        protected.add(live_version(product) or "")
    removed = []
    for number in numbers[:-keep]:
        version = f"v{number}"
        if version not in protected:
            _remove_version(folder / version)
            removed.append(version)
    if removed:
        log.info("%s: removed old bank versions %s (INSPECT_KEEP_VERSIONS)", product, removed)
    return removed
