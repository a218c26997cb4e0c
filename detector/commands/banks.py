"""A product's bank versions from the command line: list, history, add images, roll back.

    python -m detector products                          # every product and its live version
    python -m detector products carpet                   # carpet's history, oldest first
    python -m detector add-images carpet DIR --reason "new yarn batch" [--calibration DIR]
    python -m detector add-images carpet DIR --session night [--join both|bank|calibration]
    python -m detector rollback carpet v2 --reason "v3 missed a stain"
    python -m detector set-threshold carpet --target 0.02 --reason "too many shadows flagged"

They change the BentoML model store the service reads, as its /products endpoints do: a
running `bentoml serve` on the same store serves the new version within a few seconds
(INSPECT_BANK_REFRESH_S), without a restart.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from detector.anomaly_detector import AnomalyDetector, iter_features
from detector.banks import changes, precision, products, versions
from detector.banks.models import load_extractor, stored
from detector.errors import exits_on_user_error
from detector.images import images_in, read_image
from detector.memory_bank import MemoryBank
from detector.provenance import image_name
from detector.sessions import JOINS, SessionNames, check_session_name
from detector.threads import set_threads


def add_folder(
    product: str,
    folder: Path,
    reason: str = "",
    calibration: Path | None = None,
    batch_size: int = 8,
    device: str = "auto",
    session: str | None = None,
    join: str = "both",
) -> dict:
    """Add a folder of defect-free images to a product's bank: only they pass the backbone.
    Images of a later capture `session` join the bank, the calibration or both (`join`)."""
    paths = images_in(folder)
    held_out = images_in(calibration) if calibration is not None else []
    live = products.live_model(product)
    backbone = stored(live.info.metadata["backbone_model"])
    # Torch, the reference runtime: the bank's new rows are what the fit would have made.
    extractor = load_extractor(backbone, {product: live}, device=device)
    detector = AnomalyDetector.from_bank(MemoryBank.load(live.path), extractor, batch_size)
    if session is not None:  # refused before the backbone pass (and again under the lock)
        SessionNames.of(detector).check(check_session_name(session), join)
    features = np.concatenate(list(iter_features(detector.extractor, paths, batch_size)))
    # Calibration images decoded one at a time, reduced to the backbone's input, let go.
    inputs = [detector.prepare(path) for path in held_out]
    calibration_inputs = (
        (np.stack([array for array, _ in inputs]), [size for _, size in inputs]) if inputs else None
    )
    hashes = [hashlib.sha256(path.read_bytes()).hexdigest() for path in paths]
    names = [image_name(paths, index) for index in range(len(paths))]
    if session is not None:
        _, report = changes.add_session(
            product,
            session,
            features,
            hashes,
            extractor,
            join=join,
            reason=reason,
            batch_size=batch_size,
            names=names,
        )
        return report
    _, report = changes.add_images(
        product,
        features,
        hashes,
        detector.extractor,
        reason=reason,
        calibration=calibration_inputs,
        batch_size=batch_size,
        names=names,
    )
    return report


@exits_on_user_error
def products_main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="List products, or one product's history.")
    parser.add_argument("product", nargs="?", help="show this product's versions")
    parser.add_argument("--json", action="store_true", help="the whole document, as JSON")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.product:
        listing = versions.history(products.check_product(args.product))
    else:
        listing = [
            {"name": name, **versions.describe(products.live_model(name))}
            for name in products.list_products()
        ]
    print(json.dumps(listing, indent=2) if args.json else table(listing, bool(args.product)))


def table(listing: list[dict[str, Any]], history: bool) -> str:
    """A short table a person reads at a terminal: one line per version (or product)."""
    first = "version" if history else "product"
    header = f"{first:<10} {'rows':>7} {'threshold':>10} {'promise':>8}  {'change':<14} when"
    lines = [header]
    for entry in listing:
        rate = (entry.get("calibration") or {}).get("expected_false_alarm_rate")
        change = entry.get("change") or {}
        action = str(change.get("action", ""))
        if change.get("reason"):
            action += f": {change['reason']}"
        name = entry["version"] if history else f"{entry['name']} {entry['version']}"
        threshold = entry.get("threshold")
        lines.append(
            f"{name:<10} {entry.get('bank_rows') or '':>7} "
            f"{'' if threshold is None else f'{threshold:.4f}':>10} "
            f"{'' if rate is None else f'{rate:.1%}':>8}  {action[:40]:<14} "
            f"{entry.get('created', '')[:16]}"
        )
    return "\n".join(lines)


@exits_on_user_error
def add_images_main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Add defect-free images to a product's bank.")
    parser.add_argument("product")
    parser.add_argument("image_dir", type=Path)
    parser.add_argument("--reason", default="", help="why: kept in the version's history")
    exclusive = parser.add_mutually_exclusive_group()
    exclusive.add_argument(
        "--calibration", type=Path, help="held-out defect-free images: set the threshold anew"
    )
    exclusive.add_argument(
        "--session",
        help="the images are a later capture session (a shift, a day), new to the product: "
        "scored by the bank before they join it (at least 5 images unless --join bank)",
    )
    parser.add_argument(
        "--join",
        choices=JOINS,
        help="both (default): the session's scores set the threshold, then its images join "
        "the bank; calibration: they set the threshold only; bank: they join the bank only "
        "(the threshold stays, and its stated rates become upper bounds)",
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.join and not args.session:
        parser.error("--join says what a --session joins: name the session")
    set_threads(args.threads)
    report = add_folder(
        products.check_product(args.product),
        args.image_dir,
        args.reason,
        args.calibration,
        args.batch_size,
        args.device,
        args.session,
        args.join or "both",
    )
    print(json.dumps(report, indent=2))


@exits_on_user_error
def rollback_main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve an earlier version of a product's bank.")
    parser.add_argument("product")
    parser.add_argument("version", help="e.g. v2 (see `python -m detector products PRODUCT`)")
    parser.add_argument("--reason", default="")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    model = versions.rollback(products.check_product(args.product), args.version, args.reason)
    print(f"{args.product}: {model.tag} is live, with the files of {args.version}")


@exits_on_user_error
def set_threshold_main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Move a product's operating point: a new version, nothing refitted."
    )
    parser.add_argument("product")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--target", type=float, help="false-alarm target, e.g. 0.02")
    which.add_argument("--threshold", type=float, help="an explicit threshold")
    parser.add_argument("--reason", default="")
    parser.add_argument(
        "--confirm",
        action="store_true",
        help="allow a threshold far outside the calibration scores (flags every part or none)",
    )
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    _, report = changes.set_operating_point(
        products.check_product(args.product),
        target=args.target,
        threshold=args.threshold,
        reason=args.reason,
        confirm=args.confirm,
    )
    print(json.dumps(report, indent=2))


@exits_on_user_error
def set_mask_main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Ignore regions of a product's frames (white = inspect, black = ignore)."
    )
    parser.add_argument("product")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("mask", nargs="?", type=Path, help="a mask image, stretched over frames")
    which.add_argument("--clear", action="store_true", help="inspect every patch again")
    parser.add_argument("--reason", default="")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    mask = None if args.clear else read_image(args.mask)
    _, report = changes.set_mask(products.check_product(args.product), mask, args.reason)
    print(json.dumps(report, indent=2))


@exits_on_user_error
def check_int8_main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Run a product's int8 check again on its stored check images "
        "(README 'INT8 per product')."
    )
    parser.add_argument("product")
    parser.add_argument("--num-threads", type=int, default=None)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    set_threads(args.num_threads)
    product = products.check_product(args.product)
    live = products.live_model(product)
    backbone = stored(live.info.metadata["backbone_model"])
    # The reference: torch in f32, as the fit and the check made the scores.
    extractor = load_extractor(backbone, {product: live}, device="cpu")
    _, report = precision.check_int8(product, extractor, num_threads=args.num_threads)
    print(json.dumps(report, indent=2))
