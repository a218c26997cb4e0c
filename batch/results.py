"""Crash-safe results: an append-only JSONL journal, rendered to CSV at the end.

Each row is written with one `write` of a complete line and flushed; it is fsynced with every
row by default (after a kill -9 the journal holds whole rows plus at most one torn tail), or
every `fsync_every` rows where each fsync is costly (a bucket mounted over the network).
Re-opening drops the torn tail and skips, with a warning, any complete line that does not
decode, so one damaged line never stops a resume.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from detector.files import write_atomic
from detector.schema import CSV_COLUMNS

log = logging.getLogger(__name__)


def read_rows(journal: Path) -> list[dict[str, Any]]:
    """Complete rows of a journal; a torn last line (no newline) is ignored and an
    undecodable complete line is skipped with a warning."""
    if not journal.exists():
        return []
    rows = []
    with journal.open("rb") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.endswith(b"\n"):
                break
            try:
                row = json.loads(line)
                if not isinstance(row, dict) or "path" not in row:
                    raise ValueError("not a result row")
            except ValueError as error:
                log.warning(
                    "%s line %d skipped (%s): its file will be scored again", journal, number, error
                )
                continue
            rows.append(row)
    return rows


class ResultJournal:
    """Append rows durably; `latest` is the newest row per path."""

    def __init__(self, path: Path, fsync_every: int = 1) -> None:
        self.path = path
        self.fsync_every = max(1, fsync_every)
        self._unsynced = 0
        self._drop_torn_tail()
        self.rows = read_rows(path)
        self.latest = {row["path"]: row for row in self.rows}
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
        self._handle.write(json.dumps(row, allow_nan=False) + "\n")
        self._handle.flush()
        self._unsynced += 1
        if self._unsynced >= self.fsync_every:
            self.sync()
        self.rows.append(row)
        self.latest[row["path"]] = row

    def sync(self) -> None:
        if self._unsynced:
            os.fsync(self._handle.fileno())
            self._unsynced = 0

    def close(self) -> None:
        if not self._handle.closed:
            self.sync()
            self._handle.close()

    def compact(self) -> list[dict[str, Any]]:
        """Rewrite the journal with one row per path (durably); returns those rows."""
        rows = latest_per_path(self.rows)
        if len(rows) != len(self.rows):
            write_atomic(self.path, "".join(json.dumps(row) + "\n" for row in rows))
            self.rows = rows
        return rows


def write_csv(rows: Iterable[dict[str, Any]], path: Path) -> Path:
    """Write durably and atomically: a reader never sees half a CSV."""
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: row.get(key, "") for key in CSV_COLUMNS})
    write_atomic(path, buffer.getvalue())
    return path


def latest_per_path(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per path (the last written wins), sorted by path."""
    by_path = {row["path"]: row for row in rows}
    return [by_path[path] for path in sorted(by_path)]
