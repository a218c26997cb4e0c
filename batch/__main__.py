"""Score a folder of images offline, crash-safe and resumable.

    python -m batch INPUT_DIR --out OUT_DIR [--model TAG] [--heatmaps] [--batch-size N]
                    [--url http://host:3000] [--shard I/N] [--evaluate]
    python -m batch merge OUT_DIR

Writes OUT_DIR/results.jsonl (the journal, appended and fsynced row by row), results.csv,
summary.json and scores.png. Re-running the same command after a crash or Ctrl-C skips the
images already scored. Exit code: 0 all scored, 1 some files failed, 2 the job could not run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from batch.files import Shard
from batch.job import JobOptions, check_writable, merge, run_job
from batch.scorers import BatchSetupError, LocalScorer, RemoteScorer, Scorer
from detector.drift import DriftSettings
from detector.errors import user_errors_exit
from detector.runtimes import PRECISIONS, RUNTIMES


def parse_args(argv: list[str]) -> argparse.Namespace:
    defaults = DriftSettings()
    parser = argparse.ArgumentParser(prog="python -m batch", description=__doc__.splitlines()[0])
    parser.add_argument("input_dir", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", help="memory-bank model tag (default inspection-bank:latest)")
    parser.add_argument("--backbone-model", help="backbone tag (default: the bank's own)")
    parser.add_argument("--url", help="score through a running service instead of in-process")
    parser.add_argument("--api-key", default=os.environ.get("INSPECT_API_KEY"))
    parser.add_argument("--concurrency", type=int, default=4, help="parallel requests with --url")
    parser.add_argument("--heatmaps", action="store_true", help="write overlay PNGs under OUT")
    parser.add_argument("--evaluate", action="store_true", help="MVTec test folder: metrics too")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument(
        "--runtime",
        default="torch",
        choices=RUNTIMES,
        help="backbone runtime; openvino and onnxruntime run the graph stored by export (CPU)",
    )
    parser.add_argument(
        "--precision",
        default="f32",
        choices=PRECISIONS,
        help="f32; bf16 with openvino on CPUs that have it; int8 with onnxruntime",
    )
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--shard", type=Shard.parse, help="I/N: this job's share of the files")
    parser.add_argument(
        "--drift-min-images",
        type=int,
        default=defaults.min_images,
        help="below this many images the run's drift status is 'too_few_images'",
    )
    parser.add_argument(
        "--drift-alert-level",
        type=float,
        default=defaults.alert_level,
        help="drift statistic at which the status says 'drifting' (as the service's)",
    )
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


def make_scorer(args: argparse.Namespace) -> Scorer:
    if args.url:
        return RemoteScorer(args.url, args.input_dir, args.concurrency, args.api_key)
    return LocalScorer(
        args.model,
        args.backbone_model,
        args.batch_size,
        args.device,
        args.threads,
        args.runtime,
        args.precision,
    )


def run(argv: list[str]) -> int:
    if argv[:1] == ["merge"]:
        if len(argv) != 2:
            raise BatchSetupError("usage: python -m batch merge OUT_DIR")
        print(json.dumps(merge(Path(argv[1])), indent=2))
        return 0
    args = parse_args(argv)
    if not args.input_dir.is_dir():
        raise BatchSetupError(f"{args.input_dir} is not a folder.")
    if args.evaluate and args.url:
        raise BatchSetupError("--evaluate needs anomaly maps: run it without --url.")
    check_writable(args.out)
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
    )
    summary = run_job(options, make_scorer(args))
    counts = {
        key: summary[key] for key in ("images", "scored", "anomalous", "anomaly_rate", "failed")
    }
    counts["drift"] = {key: summary["drift"][key] for key in ("statistic", "status")}
    print(json.dumps(counts))
    if summary["failed"]:
        print(f"{summary['failed']} file(s) failed; see {args.out}/summary.json", file=sys.stderr)
    return 1 if summary["failed"] else 0


def main(argv: list[str] | None = None) -> int:
    with user_errors_exit():
        return run(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
