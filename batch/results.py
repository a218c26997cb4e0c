"""Crash-safe results: an append-only JSONL journal, rendered to CSV at the end.

Each row is written with one `write` of a complete line, then flushed and fsynced, so after a
kill -9 the journal holds whole rows plus at most one torn tail. Re-opening drops that tail,
and the set of paths already in the journal is what a resumed run skips.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from detector.schema import CSV_COLUMNS


def read_rows(journal: Path) -> list[dict[str, Any]]:
    """Complete rows of a journal; a torn last line (no newline) is ignored."""
    if not journal.exists():
        return []
    rows = []
    with journal.open("rb") as handle:
        for line in handle:
            if not line.endswith(b"\n"):
                break
            rows.append(json.loads(line))
    return rows


class ResultJournal:
    """Append rows durably; remembers which paths are done."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._drop_torn_tail()
        self.rows = read_rows(path)
        # Rows with an error are retried on the next run; the newest row per path wins.
        self.done = {row["path"] for row in self.rows if not row.get("error")}
        self._handle = path.open("a", encoding="utf-8")

    def _drop_torn_tail(self) -> None:
        if not self.path.exists():
            return
        with self.path.open("r+b") as handle:
            data = handle.read()
            end = data.rfind(b"\n") + 1
            if end != len(data):
                handle.truncate(end)

    def append(self, row: dict[str, Any]) -> None:
        self._handle.write(json.dumps(row) + "\n")
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self.rows.append(row)
        self.done.add(row["path"])

    def close(self) -> None:
        self._handle.close()

    def compact(self) -> list[dict[str, Any]]:
        """Rewrite the journal with one row per path (atomically); returns those rows."""
        rows = latest_per_path(self.rows)
        if len(rows) != len(self.rows):
            temporary = self.path.with_suffix(".jsonl.tmp")
            temporary.write_text("".join(json.dumps(row) + "\n" for row in rows))
            os.replace(temporary, self.path)
            self.rows = rows
        return rows


def write_csv(rows: Iterable[dict[str, Any]], path: Path) -> Path:
    """Write atomically (temp file + rename): a reader never sees half a CSV."""
    temporary = path.with_suffix(path.suffix + ".tmp")
    with temporary.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({key: row.get(key, "") for key in CSV_COLUMNS})
    os.replace(temporary, path)
    return path


def latest_per_path(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per path (the last written wins), sorted by path."""
    by_path = {row["path"]: row for row in rows}
    return [by_path[path] for path in sorted(by_path)]
