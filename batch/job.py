"""Run one batch job: find, shard, skip what is done, score, journal, summarise."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from batch.files import Shard, find_images
from batch.loader import LoadedImage, prefetch
from batch.results import ResultJournal, latest_per_path, read_rows, write_csv
from batch.scorers import BatchSetupError, Scorer
from detector import schema
from detector.data.mvtec import GOOD, Sample
from detector.drift import DriftSettings, drift_report, profile_to_list
from detector.reports.evaluation import EvaluationAccumulator
from detector.reports.plots import overlay, save_score_histogram
from detector.scoring import Calibration, make_result


@dataclass
class JobOptions:
    input_dir: Path
    out_dir: Path
    batch_size: int = 8
    heatmaps: bool = False
    evaluate: bool = False
    shard: Shard | None = None
    progress: bool = True
    # The service's drift window settings (window size is the whole run here).
    drift: DriftSettings = DriftSettings()


DRIFT_REFERENCE = "drift_reference.json"


def output_names(shard: Shard | None) -> tuple[str, str]:
    suffix = shard.suffix if shard else ""
    return f"results{suffix}.jsonl", f"results{suffix}.csv"


def heatmap_path(out_dir: Path, relative: str) -> Path:
    """OUT/heatmaps/<relative path>.png, refusing any path that would leave OUT."""
    base = (out_dir / "heatmaps").resolve()
    target = (base / relative).with_suffix(".png").resolve()
    if not target.is_relative_to(base):
        raise ValueError(f"{relative} would be written outside {base}")
    return target


def check_writable(out_dir: Path) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as error:
        raise BatchSetupError(
            f"Cannot write to {out_dir}: {error.strerror}; choose another --out."
        ) from None


def _mvtec_sample(input_dir: Path, relative: str):
    """An MVTec test image as a Sample: <input>/<good|defect>/x.png, masks in ../ground_truth."""
    parts = Path(relative).parts
    defect = parts[0] if len(parts) > 1 else GOOD
    mask = input_dir.parent / "ground_truth" / defect / f"{Path(relative).stem}_mask.png"
    label = int(defect != GOOD)
    return Sample(input_dir / relative, label, defect, mask if label and mask.exists() else None)


def save_drift_reference(scorer: Scorer, out_dir: Path) -> None:
    """Keep the bank's calibration profiles beside the results, so `merge` can recompute
    the drift statistic without loading any model."""
    reference = np.asarray(scorer.drift_reference(), dtype=np.float32)
    (out_dir / DRIFT_REFERENCE).write_text(json.dumps([profile_to_list(p) for p in reference]))


def load_drift_reference(out_dir: Path) -> np.ndarray:
    path = out_dir / DRIFT_REFERENCE
    return np.asarray(json.loads(path.read_text()) if path.exists() else [], dtype=np.float32)


def run_drift_report(
    rows: list[dict[str, Any]], reference: np.ndarray, live: DriftSettings
) -> dict[str, Any]:
    """The service's drift statistic with the whole run as its window.

    Below the service's minimum window the statistic is still given, with the status
    "too_few_images", since a short run is still worth a look.
    """
    profiles = [row["drift_profile"] for row in rows if row.get("drift_profile")]
    whole_run = DriftSettings(max(1, len(profiles)), min_images=1, alert_level=live.alert_level)
    report = drift_report(reference, profiles, whole_run)
    report["min_images"] = live.min_images
    if report["status"] in ("ok", "drifting") and len(profiles) < live.min_images:
        report["status"] = "too_few_images"
    return report


def run_job(options: JobOptions, scorer: Scorer) -> dict[str, Any]:
    images, others = find_images(options.input_dir)
    if options.shard:
        images = [path for path in images if options.shard.owns(path)]
    if not images and not others:
        raise BatchSetupError(f"{options.input_dir} holds no files to inspect.")
    journal_name, csv_name = output_names(options.shard)
    journal = ResultJournal(options.out_dir / journal_name)
    save_drift_reference(scorer, options.out_dir)
    todo = [path for path in images if path not in journal.done]
    accumulator = EvaluationAccumulator() if options.evaluate else None
    started = time.perf_counter()
    try:
        _score_all(options, scorer, todo, journal, accumulator)
    finally:
        journal.close()
    seconds = time.perf_counter() - started
    rows = journal.compact()
    write_csv(rows, options.out_dir / csv_name)
    summary = summarise(rows, options.out_dir, others, skipped=len(images) - len(todo))
    reference = load_drift_reference(options.out_dir)
    summary["drift"] = run_drift_report(rows, reference, options.drift)
    summary.update(scored_this_run=len(todo), seconds_this_run=round(seconds, 2))
    summary["images_per_second"] = round(len(todo) / seconds, 3) if seconds and todo else None
    if accumulator is not None and accumulator.labels:
        threshold = next((r["threshold"] for r in rows if not r.get("error")), 0.0)
        summary["evaluation"] = accumulator.write(
            options.out_dir / "evaluation", threshold, "batch: image ROC", {}
        )
    (options.out_dir / f"summary{options.shard.suffix if options.shard else ''}.json").write_text(
        json.dumps(summary, indent=2) + "\n"
    )
    return summary


def _score_all(
    options: JobOptions,
    scorer: Scorer,
    todo: list[str],
    journal: ResultJournal,
    accumulator: EvaluationAccumulator | None,
) -> None:
    """Score `todo` in batches as the loader threads prepare them; every file ends as one
    journal row (its result or its error) the moment it is done."""
    with_maps = options.heatmaps or options.evaluate
    bar = tqdm(total=len(todo), desc="inspect", unit="img", disable=not options.progress)
    batch: list[LoadedImage] = []

    def flush() -> None:
        for item, (row, heat) in zip(batch, scorer.score(batch, with_maps), strict=True):
            if options.heatmaps and heat is not None and not row.get("error"):
                _save_heatmap(options.out_dir, item, heat, row)
            if accumulator is not None and heat is not None:
                result = make_result(
                    row["score"], Calibration(row["threshold"], 0.0), item.image.size, heat
                )
                accumulator.add(
                    _mvtec_sample(options.input_dir, item.relative_path), result, item.image
                )
            journal.append(row)
            bar.update(1)
        batch.clear()

    try:
        for loaded in prefetch(options.input_dir, todo, scorer.prepare):
            if loaded.error:
                journal.append(schema.error_row(loaded.relative_path, loaded.error))
                bar.update(1)
                continue
            batch.append(loaded)
            if len(batch) >= options.batch_size:
                flush()
        if batch:
            flush()
    finally:
        bar.close()


def _save_heatmap(out_dir: Path, item: LoadedImage, heat: Any, row: dict[str, Any]) -> None:
    target = heatmap_path(out_dir, item.relative_path)
    target.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(heat, bytes):  # a PNG from the service
        target.write_bytes(heat)
        return
    overlay(item.image, np.asarray(heat), row["threshold"]).save(target, compress_level=1)


def summarise(
    rows: list[dict[str, Any]], out_dir: Path, others: list[str], skipped: int = 0
) -> dict[str, Any]:
    """Counts, anomaly rate, failures and a score histogram with the threshold marked."""
    scored = [row for row in rows if not row.get("error")]
    failed = [row for row in rows if row.get("error")]
    anomalous = sum(1 for row in scored if row["is_anomalous"])
    summary: dict[str, Any] = {
        "images": len(rows),
        "scored": len(scored),
        "anomalous": anomalous,
        "anomaly_rate": round(anomalous / len(scored), 4) if scored else None,
        "failed": len(failed),
        "failures": [{"path": row["path"], "error": row["error"]} for row in failed[:100]],
        "skipped_already_done": skipped,
        "non_image_files": len(others),
        "non_image_examples": others[:20],
    }
    if scored:
        threshold = scored[0]["threshold"]
        save_score_histogram([row["score"] for row in scored], threshold, out_dir / "scores.png")
        summary["threshold"] = threshold
    return summary


def merge(out_dir: Path, drift: DriftSettings | None = None) -> dict[str, Any]:
    """Combine shard journals into results.jsonl / results.csv / summary.json."""
    journals = sorted(out_dir.glob("results-shard-*.jsonl"))
    if not journals:
        raise BatchSetupError(f"{out_dir} holds no shard results (results-shard-*.jsonl).")
    rows = latest_per_path(row for journal in journals for row in read_rows(journal))
    (out_dir / "results.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    write_csv(rows, out_dir / "results.csv")
    summary = summarise(rows, out_dir, [])
    summary["drift"] = run_drift_report(
        rows, load_drift_reference(out_dir), drift or DriftSettings()
    )
    summary["merged_shards"] = [journal.name for journal in journals]
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
