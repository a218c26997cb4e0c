"""`python -m batch merge OUT`: the shards' journals as one result, once every shard of one
split has its results and all were scored by the same models."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from batch.job import load_drift_reference, models_used, run_drift_report, summarise
from batch.outputs import locked
from batch.results import latest_per_path, read_rows, write_csv
from batch.scorers import BatchSetupError
from detector.drift import DriftSettings
from detector.files import write_atomic

SHARD_JOURNAL = re.compile(r"^results-shard-(\d{4})-of-(\d{4})\.jsonl$")


def check_every_shard(journals: list[Path]) -> None:
    """Shards 0..N-1 of one N, each there once: a merge of 2 of 8 shards is not a result."""
    found = [SHARD_JOURNAL.match(journal.name) for journal in journals]
    counts = {int(match.group(2)) for match in found if match}
    if None in found or len(counts) != 1:
        names = ", ".join(journal.name for journal in journals)
        raise BatchSetupError(f"The shard results are of different splits ({names}).")
    (count,) = counts
    missing = sorted(set(range(count)) - {int(match.group(1)) for match in found if match})
    if missing:
        raise BatchSetupError(
            f"Shards {', '.join(map(str, missing))} of {count} have no results yet: run them "
            "(or wait for them) before merging."
        )


def merge(
    out_dir: Path, drift: DriftSettings | None = None, allow_mixed_models: bool = False
) -> dict[str, Any]:
    """Combine shard journals into results.jsonl / results.csv / summary.json.

    Shards scored by different models (or thresholds) are refused: one summary with two
    thresholds would count anomalies on two scales without saying so.
    """
    with locked(out_dir / ".lock-merge"):
        journals = sorted(out_dir.glob("results-shard-*.jsonl"))
        if not journals:
            raise BatchSetupError(f"{out_dir} holds no shard results (results-shard-*.jsonl).")
        check_every_shard(journals)
        rows = latest_per_path(row for journal in journals for row in read_rows(journal))
        used = models_used([row for row in rows if not row.get("error")])
        if len(used) > 1 and not allow_mixed_models:
            names = "; ".join(f"{m['bank']} ({m['images']} images)" for m in used)
            raise BatchSetupError(
                f"The shards in {out_dir} were scored by different models or thresholds "
                f"({names}): score the stale shards again, or pass --allow-mixed-models."
            )
        write_atomic(out_dir / "results.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
        write_csv(rows, out_dir / "results.csv")
        summary = summarise(rows, out_dir / "scores.png", [])
        reference, promised = load_drift_reference(sorted(out_dir.glob("drift_reference*.json")))
        summary["drift"] = run_drift_report(rows, reference, drift or DriftSettings(), promised)
        summary["merged_shards"] = [journal.name for journal in journals]
        write_atomic(out_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
        return summary
