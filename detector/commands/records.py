"""Inspection records from the command line: replay them, export their reviews, migrate.

    python -m detector replay [--since 2026-11-01] [--product carpet]
    python -m detector export-reviews OUT [--product carpet]
    python -m detector migrate-records
    python -m detector suggest-threshold carpet [--target 0.01] [--days 7] [--apply]

They find the records where a `bentoml serve` on the same machine keeps them
(<BENTOML_HOME>/records, or INSPECT_RECORDS_DIR / INSPECT_RECORDS_DB, as the service), or
where --records-dir and --db say.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from detector.errors import Exit, UserError, exits_on_user_error
from detector.records.images import ImageStore
from detector.records.query import parse_time
from detector.records.store import RecordStore, locate_records, safe_url


def add_location_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """--records-dir and --records-db, defaulting to where the service keeps its records
    (also for `python -m batch --record`)."""
    parser.add_argument(
        "--records-dir",
        default=os.environ.get("INSPECT_RECORDS_DIR"),
        help="the records folder (default: <BENTOML_HOME>/records, where the service keeps them)",
    )
    parser.add_argument(
        "--records-db",
        default=os.environ.get("INSPECT_RECORDS_DB"),
        help="SQLAlchemy URL of the records database (default: SQLite in the records folder)",
    )


def _parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    add_location_arguments(parser)
    return parser


def _open(args: argparse.Namespace) -> tuple[RecordStore, ImageStore]:
    folder, url = locate_records(args.records_dir, args.records_db)
    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).exists():
        raise UserError(
            f"No records database at {safe_url(url)}: pass --records-dir or --records-db where the "
            "service keeps its records."
        )
    store = RecordStore(url)
    store.check()
    return store, ImageStore(folder / "images")


@exits_on_user_error
def replay_main(argv: list[str] | None = None) -> int:
    parser = _parser("Rescore recorded images with the model versions their records name.")
    parser.add_argument("--since", help="only records from this time on (ISO 8601)")
    parser.add_argument("--product")
    parser.add_argument("--runtime", default="torch", help="the runtime the service used")
    parser.add_argument("--precision", default="f32")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--tolerance", type=float, default=1e-5, help="largest |score change|")
    parser.add_argument("--out", type=Path, help="also write the report here (JSON)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    from detector.banks.models import load_pair
    from detector.records.replay import replay

    def load_detector(bank_tag: str, backbone_tag: str) -> object:
        pair = load_pair(
            bank_tag,
            backbone_tag,
            runtime=args.runtime,
            precision=args.precision,
            device=args.device,
            batch_size=args.batch_size,
        )
        return pair.detector

    store, images = _open(args)
    report = replay(
        store,
        images,
        load_detector,
        since=parse_time("--since", args.since),
        product=args.product,
        settings={"runtime": args.runtime, "precision": args.precision},
        batch_size=args.batch_size,
        tolerance=args.tolerance,
    ).to_dict()
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    if report["checked"] == 0:
        print("nothing replayed: no record with a kept image matched", file=sys.stderr)
    return Exit.DIFFERENCES if report["differing"] else Exit.OK


@exits_on_user_error
def export_reviews_main(argv: list[str] | None = None) -> None:
    parser = _parser("Write reviewed images in the MVTec AD layout.")
    parser.add_argument("out", type=Path)
    parser.add_argument("--product")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    from detector.records.export import export_reviews

    store, images = _open(args)
    print(json.dumps(export_reviews(store, images, args.out, args.product), indent=2))


@exits_on_user_error
def migrate_main(argv: list[str] | None = None) -> None:
    parser = _parser("Bring the records database's schema up to date.")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    folder, url = locate_records(args.records_dir, args.records_db)
    folder.mkdir(parents=True, exist_ok=True)
    store = RecordStore(url)
    before, head = store.revisions()
    store.migrate()
    print(f"{safe_url(url)}: schema {before or 'empty'} -> {head}")


@exits_on_user_error
def suggest_threshold_main(argv: list[str] | None = None) -> None:
    parser = _parser(
        "False-alarm and detection rates of reviewed records at the live threshold and at a "
        "suggested one; --apply makes the suggestion a new version."
    )
    parser.add_argument("product")
    parser.add_argument("--target", type=float, help="false-alarm target (default: the bank's)")
    parser.add_argument("--days", type=float, default=7.0, help="records of the last N days")
    parser.add_argument("--apply", action="store_true", help="set the suggested threshold")
    parser.add_argument("--reason", default="suggested from reviewed records")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    from detector.records.suggest import apply_suggestion, threshold_suggestion

    store, _ = _open(args)
    if args.apply:
        report = apply_suggestion(store, args.product, args.target, args.days, args.reason)
    else:
        report = threshold_suggestion(store, args.product, args.target, args.days)
    print(json.dumps(report, indent=2))
