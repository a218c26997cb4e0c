"""Score a folder of images offline, crash-safe and resumable.

    python -m batch INPUT_DIR --out OUT_DIR [--product NAME] [--heatmaps] [--batch-size N]
                    [--url http://host:3000] [--shard I/N] [--evaluate] [--record]
    python -m batch merge OUT_DIR

Writes OUT_DIR/results.jsonl (the journal, appended and fsynced row by row), results.csv,
summary.json and scores.png. Re-running the same command after a crash or Ctrl-C skips the
images already scored (the same file, scored by the same models).

Exit codes, for orchestrators: 0 the run finished (files that failed are recorded and
counted in summary.json; a shard that owns no file writes empty results), 2 the job could
not run (one `error:` line says why; `merge` with a shard missing), 3 the run was
interrupted (SIGINT, SIGTERM) or crashed: run the same command again to resume, 4 another
job holds OUT (this shard of it): retry later.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import traceback
from pathlib import Path

from batch.files import Shard
from batch.job import JobOptions, run_job
from batch.merge import merge
from batch.outputs import check_writable
from batch.scorers import BatchSetupError, LocalScorer, OutputBusyError, RemoteScorer, Scorer
from detector.commands.records import add_location_arguments
from detector.drift import DriftSettings
from detector.errors import Exit, user_errors_exit
from detector.records.images import KEEP_POLICIES
from detector.runtimes import PRECISIONS, RUNTIMES
from detector.threads import usable_cpus


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m batch", description=__doc__.splitlines()[0])
    parser.add_argument("input_dir", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument(
        "--product", help="the product whose live bank scores (optional when there is one)"
    )
    parser.add_argument("--model", help="a bank version's tag instead (e.g. bank-carpet:v2)")
    parser.add_argument("--backbone-model", help="backbone tag (default: the bank's own)")
    parser.add_argument("--heatmaps", action="store_true", help="write overlay PNGs under OUT")
    parser.add_argument("--heatmap-max-side", type=int, default=2048, help="long side of heatmaps")
    parser.add_argument("--evaluate", action="store_true", help="MVTec test folder: metrics too")
    parser.add_argument("--shard", type=Shard.parse, help="I/N: this job's share of the files")
    parser.add_argument("--no-progress", action="store_true")
    add_backbone_arguments(parser.add_argument_group("in-process scoring"))
    add_service_arguments(parser.add_argument_group("scoring through a running service"))
    add_journal_arguments(parser.add_argument_group("journal, drift and records"))
    return parser.parse_args(argv)


def add_backbone_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--batch-size", type=int, default=8)
    group.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    group.add_argument(
        "--runtime",
        default="torch",
        choices=RUNTIMES,
        help="backbone runtime; openvino and onnxruntime run the graph stored by export (CPU)",
    )
    group.add_argument(
        "--precision",
        default="f32",
        choices=PRECISIONS,
        help="f32; bf16 with openvino on CPUs that have it; int8 with onnxruntime",
    )
    group.add_argument("--threads", type=int, default=usable_cpus())


def add_service_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--url", help="score through a running service instead of in-process")
    group.add_argument("--api-key", default=os.environ.get("INSPECT_API_KEY"))
    group.add_argument("--concurrency", type=int, default=4, help="parallel requests with --url")
    group.add_argument("--timeout", type=float, default=120.0, help="seconds per request (--url)")
    group.add_argument("--retries", type=int, default=3, help="tries after the first (--url)")
    group.add_argument(
        "--retry-backoff", type=float, default=1.0, help="first wait in seconds, doubling (--url)"
    )


def add_journal_arguments(group: argparse._ArgumentGroup) -> None:
    defaults = DriftSettings()
    group.add_argument(
        "--drift-min-images",
        type=int,
        default=defaults.min_images,
        help="below this many images the run's drift status is 'too_few_images'",
    )
    group.add_argument(
        "--drift-alert-level",
        type=float,
        default=defaults.alert_level,
        help="drift statistic at which the status says 'drifting' (as the service's)",
    )
    group.add_argument(
        "--fsync-every",
        type=int,
        default=1,
        help="journal rows per fsync (1: every row; e.g. 64 on a network-mounted bucket)",
    )
    group.add_argument(
        "--hash",
        action="store_true",
        help="resume compares each file's SHA-256 too, not only its size and mtime",
    )
    group.add_argument(
        "--record",
        action="store_true",
        help="also record each decision in the service's records database (review, replay)",
    )
    add_location_arguments(group)
    group.add_argument(
        "--keep-images",
        default="flagged",
        choices=KEEP_POLICIES,
        help="which scored images --record keeps for review and replay",
    )


def make_scorer(args: argparse.Namespace) -> Scorer:
    if args.url:
        return RemoteScorer(
            args.url,
            args.input_dir,
            args.concurrency,
            args.api_key,
            args.timeout,
            attempts=args.retries + 1,
            backoff_s=args.retry_backoff,
            product=args.product,
        )
    return LocalScorer(
        args.product,
        args.model,
        args.backbone_model,
        args.batch_size,
        args.device,
        args.threads,
        args.runtime,
        args.precision,
        args.heatmap_max_side,
    )


def run(argv: list[str]) -> int:
    if argv[:1] == ["merge"]:
        merging = argparse.ArgumentParser(prog="python -m batch merge")
        merging.add_argument("out_dir", type=Path)
        merging.add_argument("--allow-mixed-models", action="store_true")
        merging.add_argument("--no-progress", action="store_true")  # accepted, as for a run
        options = merging.parse_args(argv[1:])
        summary = merge(options.out_dir, allow_mixed_models=options.allow_mixed_models)
        print(json.dumps(summary, indent=2))
        return 0
    args = parse_args(argv)
    if not args.input_dir.is_dir():
        raise BatchSetupError(f"{args.input_dir} is not a folder.")
    if args.evaluate and args.url:
        raise BatchSetupError("--evaluate needs anomaly maps: run it without --url.")
    if args.record and args.url:
        raise BatchSetupError(
            "--record is for in-process runs: with --url the service records what it scores."
        )
    created = not args.out.exists()
    check_writable(args.out)
    try:
        return run_checked(args)
    except OutputBusyError:
        raise  # another job's OUT: its lock file is not ours to remove
    except BaseException:
        if created:  # failed before scoring anything: no empty folder left behind
            remove_if_unused(args.out)
        raise


def remove_if_unused(out: Path) -> None:
    """Remove OUT when it holds nothing but this run's lock files."""
    leftovers = list(out.iterdir()) if out.is_dir() else []
    if all(path.name.startswith(".lock") and path.is_file() for path in leftovers):
        for path in leftovers:
            path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            out.rmdir()


def run_checked(args: argparse.Namespace) -> int:
    """The job, once its arguments are checked and OUT is writable."""
    drift = DriftSettings(
        max(args.drift_min_images, 1), args.drift_min_images, args.drift_alert_level
    )
    options = JobOptions(
        args.input_dir,
        args.out,
        args.batch_size,
        args.heatmaps,
        args.evaluate,
        args.shard or Shard.from_environment(),
        progress=not args.no_progress,
        drift=drift,
        fsync_every=args.fsync_every,
        content_hash=args.hash,
    )
    scorer = make_scorer(args)
    recorder = None
    if args.record:
        from batch.records import BatchRecorder

        recorder = BatchRecorder(
            args.input_dir,
            args.records_dir,
            args.records_db,
            args.keep_images,
            scorer.product,
            scorer.settings_hash,
        )
        options.on_scored = recorder
    try:
        summary = run_job(options, scorer)
    finally:
        recorded = recorder.close() if recorder is not None else None
    counts = {
        key: summary[key] for key in ("images", "scored", "anomalous", "anomaly_rate", "failed")
    }
    counts["drift"] = {key: summary["drift"][key] for key in ("statistic", "status")}
    if recorded is not None:
        counts["records"] = recorded
    print(json.dumps(counts))
    if summary["failed"]:
        print(f"{summary['failed']} file(s) failed; see {args.out}/summary.json", file=sys.stderr)
    print(f"results: {args.out} (results.csv, summary.json, scores.png)", file=sys.stderr)
    return 0


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # unwind: the journal closes (synced) and the lock is released


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _terminate)  # what Kubernetes and Cloud Run send first
    try:
        with user_errors_exit():
            try:
                return run(sys.argv[1:] if argv is None else argv)
            except OutputBusyError as error:
                print(f"error: {error}", file=sys.stderr)
                return Exit.BUSY
    except KeyboardInterrupt:
        print("interrupted: run the same command again to resume", file=sys.stderr)
    except Exception:
        traceback.print_exc()
        print("the job stopped unexpectedly; run the same command again to resume", file=sys.stderr)
    return Exit.INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
