"""Run one batch job: lock OUT, find, shard, skip what is current, score, journal, summarise.

Everything a job writes carries its shard's suffix (or is written atomically), and OUT is
locked for the whole run, so a second job on the same OUT (a replacement pod while the old
one terminates) stops with one sentence instead of interleaving rows.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from batch.files import Shard, find_images
from batch.loader import LoadedImage, prefetch
from batch.outputs import Outputs, heatmap_path, locked
from batch.results import ResultJournal, write_csv
from batch.scorers import BatchSetupError, Scorer
from detector import schema
from detector.data.mvtec import GOOD, Sample
from detector.drift import DriftSettings, drift_report, profile_to_list
from detector.files import write_atomic
from detector.reports.evaluation import EvaluationAccumulator
from detector.reports.plots import overlay, save_score_histogram
from detector.scoring import Calibration, make_result

IDENTITY_FIELDS = ("input_root", "size", "mtime_ns", "sha256")


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
    fsync_every: int = 1  # journal rows per fsync; raise it on network-mounted buckets
    content_hash: bool = False  # resume compares SHA-256 too, not only size and mtime
    # Called with each image scored into the journal and its row (--record: batch/records.py).
    on_scored: Callable[[LoadedImage, dict[str, Any]], None] | None = None


def file_identity(root: Path, relative: str, content_hash: bool) -> dict[str, Any]:
    """What a journal row records of its input file, so a resumed run can tell it is the
    same file: the input root, size and modification time (and the SHA-256 on request)."""
    path = root / relative
    try:
        info = path.stat()
    except OSError:
        return {"input_root": str(root)}
    identity: dict[str, Any] = {
        "input_root": str(root),
        "size": info.st_size,
        "mtime_ns": info.st_mtime_ns,
    }
    if content_hash:
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        identity["sha256"] = digest.hexdigest()
    return identity


def is_current(
    row: dict[str, Any] | None, identity: dict[str, Any], models: dict[str, str]
) -> bool:
    """A journal row still stands for this file and these models (else: score it again)."""
    if row is None or row.get("error"):
        return False
    same_file = all(row.get(key) == identity.get(key) for key in IDENTITY_FIELDS)
    same_models = all(
        row.get(column) == models[name]
        for name, column in zip(schema.MODEL_FIELDS, schema.ROW_MODEL_COLUMNS, strict=True)
    )
    return same_file and same_models


def _mvtec_sample(input_dir: Path, relative: str):
    """An MVTec test image as a Sample: <input>/<good|defect>/x.png, masks in ../ground_truth."""
    parts = Path(relative).parts
    defect = parts[0] if len(parts) > 1 else GOOD
    mask = input_dir.parent / "ground_truth" / defect / f"{Path(relative).stem}_mask.png"
    label = int(defect != GOOD)
    return Sample(input_dir / relative, label, defect, mask if label and mask.exists() else None)


def save_drift_reference(scorer: Scorer, path: Path) -> None:
    """Keep the bank's calibration profiles and promised false-alarm rate beside the
    results, so `merge` can recompute the drift report without loading any model."""
    reference = np.asarray(scorer.drift_reference(), dtype=np.float32)
    document = {
        "profiles": [profile_to_list(p) for p in reference],
        "promised_rate": scorer.promised_rate,
    }
    write_atomic(path, json.dumps(document))


def load_drift_reference(paths: list[Path]) -> tuple[np.ndarray, float | None]:
    """(reference profiles, promised false-alarm rate); files written before the rate was
    kept hold only the profiles."""
    found = [path for path in paths if path.exists()]
    document = json.loads(found[0].read_text()) if found else []
    if isinstance(document, list):
        document = {"profiles": document, "promised_rate": None}
    return np.asarray(document["profiles"], dtype=np.float32), document["promised_rate"]


def run_drift_report(
    rows: list[dict[str, Any]],
    reference: np.ndarray,
    live: DriftSettings,
    promised_rate: float | None = None,
) -> dict[str, Any]:
    """The service's drift report with the whole run as its window: the statistic, and the
    run's flagged share against the calibration's promised rate.

    Below the service's minimum window the statistic is still given, with the status
    "too_few_images", since a short run is still worth a look.
    """
    profiles = [row["drift_profile"] for row in rows if row.get("drift_profile")]
    flags = [bool(row["is_anomalous"]) for row in rows if not row.get("error")]
    whole_run = DriftSettings(
        max(1, len(profiles), len(flags)),
        min_images=1,
        alert_level=live.alert_level,
        flag_alpha=live.flag_alpha,
        defect_rate=live.defect_rate,
    )
    report = drift_report(reference, profiles, whole_run, flags, promised_rate)
    report["min_images"] = live.min_images
    if report["status"] in ("ok", "drifting") and len(profiles) < live.min_images:
        report["status"] = "too_few_images"
    return report


def run_job(options: JobOptions, scorer: Scorer) -> dict[str, Any]:
    outputs = Outputs.of(options.out_dir, options.shard)
    with locked(outputs.lock):
        return _run_locked(options, scorer, outputs)


def _run_locked(options: JobOptions, scorer: Scorer, outputs: Outputs) -> dict[str, Any]:
    root = options.input_dir.resolve()
    listing = find_images(root, exclude=options.out_dir)
    if not listing.images and not listing.others:
        raise BatchSetupError(f"{options.input_dir} holds no files to inspect.")
    images = listing.images
    if options.shard:  # a shard that owns none of them still writes its (empty) results
        images = [path for path in images if options.shard.owns(path)]
    journal = ResultJournal(outputs.journal, options.fsync_every)
    save_drift_reference(scorer, outputs.drift_reference)
    identities = {path: file_identity(root, path, options.content_hash) for path in images}
    done = [
        path
        for path in images
        if is_current(journal.latest.get(path), identities[path], scorer.models)
    ]
    todo = sorted(set(images) - set(done))
    accumulator = EvaluationAccumulator() if options.evaluate else None
    started = time.perf_counter()
    try:
        _score_all(options, scorer, todo, journal, accumulator, identities)
        if accumulator is not None and done:  # the journal keeps no maps: score them again
            _score_all(options, scorer, done, None, accumulator, identities)
    finally:
        journal.close()
    seconds = time.perf_counter() - started
    wanted = set(images)
    rows = [row for row in journal.compact() if row["path"] in wanted]
    write_csv(rows, outputs.csv)
    summary = summarise(rows, outputs.scores_plot, listing.others, scorer.models)
    summary["skipped_already_done"] = len(done)
    summary["skipped_special_files"] = listing.skipped[:100]
    reference, promised_rate = load_drift_reference([outputs.drift_reference])
    summary["drift"] = run_drift_report(rows, reference, options.drift, promised_rate)
    summary.update(scored_this_run=len(todo), seconds_this_run=round(seconds, 2))
    summary["images_per_second"] = round(len(todo) / seconds, 3) if seconds and todo else None
    if accumulator is not None and accumulator.labels:
        threshold = next((r["threshold"] for r in rows if not r.get("error")), 0.0)
        summary["evaluation"] = accumulator.write(
            outputs.evaluation, threshold, "batch: image ROC", {}
        )
    write_atomic(outputs.summary, json.dumps(summary, indent=2) + "\n")
    return summary


def _score_all(
    options: JobOptions,
    scorer: Scorer,
    paths: list[str],
    journal: ResultJournal | None,
    accumulator: EvaluationAccumulator | None,
    identities: dict[str, dict[str, Any]],
) -> None:
    """Score `paths` in batches as the loader threads prepare them; with a journal every
    file ends as one row (its result or its error) the moment it is done, without one the
    results only feed the evaluation."""
    with_maps = (options.heatmaps and journal is not None) or options.evaluate
    bar = tqdm(total=len(paths), desc="inspect", unit="img", disable=not options.progress)
    batch: list[LoadedImage] = []

    def record(row: dict[str, Any]) -> None:
        if journal is not None:
            journal.append({**row, **identities[row["path"]]})
        bar.update(1)

    def flush() -> None:
        for item, (row, heat) in zip(batch, scorer.score(batch, with_maps), strict=True):
            if journal is not None and options.heatmaps and heat is not None and not row["error"]:
                _save_heatmap(options.out_dir, item, heat, row)

            if accumulator is not None and heat is not None and not row["error"]:
                result = make_result(
                    row["score"], Calibration(row["threshold"], 0.0), item.image.size, heat
                )
                accumulator.add(
                    _mvtec_sample(options.input_dir, item.relative_path), result, item.image
                )
            record(row)
            if journal is not None and options.on_scored is not None and not row["error"]:
                options.on_scored(item, row)  # after its journal row: a resume won't redo it
        batch.clear()

    try:
        for loaded in prefetch(options.input_dir, paths, scorer.prepare):
            if loaded.error:
                record(schema.error_row(loaded.relative_path, loaded.error))
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
    rows: list[dict[str, Any]],
    plot: Path,
    others: list[str],
    models: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Counts, anomaly rate, failures, the models that scored, and a score histogram."""
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
        "non_image_files": len(others),
        "non_image_examples": others[:20],
        "models": models_used(scored) or ([dict(models)] if models else []),
    }
    if scored:
        threshold = scored[0]["threshold"]
        save_score_histogram([row["score"] for row in scored], threshold, plot)
        summary["threshold"] = threshold
    return summary


def models_used(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each (backbone, bank, threshold) that scored some rows, with its count."""
    counts: dict[tuple[str, str, float], int] = {}
    for row in rows:
        key = (row.get("backbone_model", ""), row.get("bank_model", ""), row["threshold"])
        counts[key] = counts.get(key, 0) + 1
    return [
        {"backbone": backbone, "bank": bank, "threshold": threshold, "images": count}
        for (backbone, bank, threshold), count in sorted(counts.items())
    ]
