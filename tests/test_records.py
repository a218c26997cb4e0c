"""Inspection records in a real database: SQLite always, PostgreSQL where it is installed.

In-process tests of the store and the writer run against both; the served tests (review
queue, bank changes from reviews, replay, export, outages) are in test_review.py.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import inspect as schema_of

from detector.records.images import ImageStore
from detector.records.model import REVIEW_COLUMNS, Inspection, new_record_id, utc_now
from detector.records.store import (
    RecordNotFound,
    RecordQuery,
    RecordsError,
    RecordStore,
    decode_cursor,
)
from detector.records.writer import RecordWriter
from detector.serving.records import query_from


def a_record(number: int, **changes: Any) -> dict[str, Any]:
    record = {
        "id": new_record_id(),
        "created_at": utc_now(),
        "source": "service",
        "product": "carpet" if number % 3 else "tile",
        "image_sha256": f"{number:064x}",
        "image_bytes": 1000 + number,
        "image_width": 64,
        "image_height": 48,
        "image_name": None,
        "image_kept": False,
        "score": 0.01 * number,
        "threshold": 0.2,
        "is_anomalous": 0.01 * number > 0.2,
        "backbone_model": "dino-backbone:abc",
        "bank_model": "bank-carpet:v1",
        "settings_hash": "0123456789abcdef",
        "latency_ms": 12.5,
        "api_key_id": "line3",
    }
    record.update(changes)
    return record


@pytest.fixture
def records(records_url: str) -> RecordStore:
    store = RecordStore(records_url, connect_timeout_s=1)
    store.migrate()
    yield store
    store.close()


def test_migrations_create_the_table_the_code_writes_and_a_stale_schema_is_refused(
    records_url: str,
) -> None:
    store = RecordStore(records_url)
    with pytest.raises(RecordsError, match="migrate-records"):
        store.check()  # empty database: no revision yet
    store.migrate()
    store.migrate()  # a second start changes nothing
    store.check()
    current, head = store.revisions()
    assert current == head
    table = schema_of(store.engine)
    migrated = {column["name"]: column["nullable"] for column in table.get_columns("inspections")}
    declared = {column.name: column.nullable for column in Inspection.__table__.columns}
    assert migrated == declared
    migrated_indexes = {index["name"] for index in table.get_indexes("inspections")}
    declared_indexes = {index.name for index in Inspection.__table__.indexes}
    assert declared_indexes <= migrated_indexes
    store.close()


def test_pages_cover_every_record_once_newest_first_and_filters_hold(records: RecordStore) -> None:
    batch = [a_record(number) for number in range(40)]
    assert records.insert(batch) == 40
    assert records.insert(batch[:10]) == 0  # written again (a spool replayed): nothing new
    seen, cursor = [], None
    while True:
        page, cursor = records.list(RecordQuery(limit=7, cursor=cursor))
        seen += [row["id"] for row in page]
        if cursor is None:
            break
    assert seen == sorted((r["id"] for r in batch), reverse=True)
    flagged, _ = records.list(RecordQuery(verdict="anomalous", product="carpet", limit=500))
    expected = {r["id"] for r in batch if r["is_anomalous"] and r["product"] == "carpet"}
    assert {row["id"] for row in flagged} == expected and expected
    middle = batch[20]["created_at"]
    later, _ = records.list(RecordQuery(since=middle, limit=500))
    assert {row["id"] for row in later} == {r["id"] for r in batch if r["created_at"] >= middle}
    earlier, _ = records.list(RecordQuery(until=middle - timedelta(microseconds=1), limit=500))
    assert len(earlier) + len(later) == 40
    row = records.get(batch[5]["id"])
    assert row["created_at"] == batch[5]["created_at"].isoformat()
    assert row["api_key_id"] == "line3" and row["verdict"] == "normal"


def test_a_review_changes_only_the_review_fields(records: RecordStore) -> None:
    batch = [a_record(number) for number in (25, 26, 2)]
    records.insert(batch)
    before = records.get(batch[0]["id"])
    reviewed = records.review(batch[0]["id"], "false_alarm", "shadow of the gantry", "ann / line3")
    assert reviewed["review_label"] == "false_alarm"
    assert reviewed["reviewed_by"] == "ann / line3"
    reviewed_at = datetime.fromisoformat(reviewed["reviewed_at"])
    assert abs(reviewed_at - datetime.now(UTC)) < timedelta(minutes=1)
    changed = {key for key in before if before[key] != reviewed[key]}
    assert changed == {"review_label", "review_note", "reviewed_by", "reviewed_at"}
    assert changed <= set(REVIEW_COLUMNS)
    records.review(batch[1]["id"], "confirmed_defect", None, None)
    records.mark_added([batch[0]["id"]], "bank-carpet:v2")
    assert records.get(batch[0]["id"])["added_to"] == "bank-carpet:v2"
    summary = records.review_summary()
    carpet = summary["carpet"] if batch[0]["product"] == "carpet" else summary["tile"]
    assert carpet["flagged_false_alarm"] + carpet.get("flagged_confirmed_defect", 0) >= 1
    unreviewed, _ = records.list(RecordQuery(reviewed=False, limit=10))
    assert [row["id"] for row in unreviewed] == [batch[2]["id"]]
    with pytest.raises(RecordNotFound):
        records.review("0" * 26, "unsure", None, None)
    with pytest.raises(RecordsError, match="label must be one of"):
        records.review(batch[2]["id"], "looks_fine", None, None)
    assert records.get(batch[2]["id"])["review_label"] is None


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"limit": "0"}, "limit must be between"),
        ({"limit": "501"}, "limit must be between"),
        ({"limit": "-3"}, "whole number"),
        ({"limit": "many"}, "whole number"),
        ({"verdict": "bad"}, "verdict must be"),
        ({"reviewed": "maybe"}, "reviewed must be"),
        ({"label": "fine"}, "label must be"),
        ({"since": "yesterday"}, "ISO 8601"),
        ({"since": "2026-11-02", "until": "2026-11-01"}, "since must not be after"),
    ],
)
def test_paging_and_filter_parameters_out_of_range_are_refused(
    params: dict[str, str], message: str
) -> None:
    with pytest.raises(RecordsError, match=message):
        query_from(params)


def test_a_cursor_not_given_out_is_refused() -> None:
    for cursor in ("!!!", "bm90IGFuIGlk_with_junk", "JyBPUiAxPTEgLS0"):  # the last: "' OR 1=1 --"
        with pytest.raises(RecordsError, match="cursor"):
            decode_cursor(cursor)


def _outage(records_url: str, request: pytest.FixtureRequest) -> tuple[Any, Any]:
    """(begin, end) of a database outage: the PostgreSQL server stopped, or the SQLite file
    locked by another writer (what a stuck writer or a full disk looks like to SQLite)."""
    if records_url.startswith("sqlite"):
        holder: dict[str, sqlite3.Connection] = {}

        def begin() -> None:
            holder["lock"] = sqlite3.connect(records_url.removeprefix("sqlite:///"))
            holder["lock"].execute("BEGIN EXCLUSIVE")

        def end() -> None:
            holder["lock"].rollback()
            holder["lock"].close()

        return begin, end
    server = request.getfixturevalue("postgres")
    return server.stop, server.start


def test_records_are_spooled_while_the_database_is_down_and_all_arrive_once_it_is_back(
    records_url: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    store = RecordStore(records_url, connect_timeout_s=0.5)
    counts: dict[str, int] = {}
    writer = RecordWriter(
        store,
        tmp_path / "spool",
        ImageStore(tmp_path / "images", keep="all"),
        prepare=store.migrate,
        retry_s=0.3,
        on_count=lambda outcome, n: counts.__setitem__(outcome, counts.get(outcome, 0) + n),
    )
    begin, end = _outage(records_url, request)
    submitted = []
    try:
        for number in range(20):
            submitted.append(a_record(number))
            assert writer.submit(submitted[-1], b"image %d" % number)
        assert writer.flush()
        begin()
        try:
            for number in range(20, 60):
                submitted.append(a_record(number))
                assert writer.submit(submitted[-1], b"image %d" % number)  # queued, not waited
            assert writer.flush()
            assert writer.pending_spool() > 0 and counts["spooled"] > 0
        finally:
            end()
        deadline = time.monotonic() + 30
        while writer.pending_spool() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert writer.pending_spool() == 0
        stored = {row["id"] for row in store.iterate()}
        assert stored == {record["id"] for record in submitted}
        assert store.count() == 60 and counts.get("dropped", 0) == 0
        assert all(store.get(record["id"])["image_kept"] for record in submitted)
    finally:
        writer.close()
        store.close()


def test_a_full_spool_drops_and_counts_instead_of_growing(tmp_path: Path) -> None:
    from detector.serving.local_server import free_port

    # A database server that is not there: every connection is refused at once.
    store = RecordStore(f"postgresql+psycopg://nobody@127.0.0.1:{free_port()}/none")
    counts: dict[str, int] = {}
    writer = RecordWriter(
        store,
        tmp_path / "spool",
        spool_max_bytes=2000,
        flush_s=0.01,
        prepare=store.migrate,
        on_count=lambda outcome, n: counts.__setitem__(outcome, counts.get(outcome, 0) + n),
    )
    for number in range(30):
        writer.submit(a_record(number))
        writer.flush()
    writer.close()
    assert counts["spooled"] + counts["dropped"] == 30 and counts["dropped"] > 0
    assert sum(p.stat().st_size for p in (tmp_path / "spool").glob("*.jsonl")) <= 2000


def test_image_retention_removes_old_images_then_the_oldest_beyond_the_size_limit(
    tmp_path: Path,
) -> None:
    images = ImageStore(tmp_path, keep="flagged", max_age_days=1, max_mb=3000 / 2**20)
    assert images.wants(True) and not images.wants(False)
    now = time.time()
    hashes = [f"{number:064x}" for number in range(5)]
    for age_days, sha in zip((3, 0.5, 0.4, 0.3, 0.2), hashes, strict=True):
        images.put(sha, b"x" * 1000)
        moment = now - age_days * 86400
        import os

        os.utime(images.path(sha), (moment, moment))
    pruned = images.prune(now)
    # The 3-day-old image by age, then the oldest until 3000 bytes remain.
    assert pruned.removed == 2 and pruned.freed_bytes == 2000
    assert [images.available(sha) for sha in hashes] == [False, False, True, True, True]
    images.put(hashes[2], b"x" * 1000)  # stored again: kept, its age reset
    assert images.path(hashes[2]).stat().st_mtime > now - 60
    assert images.get("not a hash") is None and not images.available("../../etc/passwd")


def test_writes_from_many_threads_all_arrive(records: RecordStore, tmp_path: Path) -> None:
    writer = RecordWriter(records, tmp_path / "spool", batch_size=16)
    submitted: list[str] = []

    def client(offset: int) -> None:
        for number in range(50):
            record = a_record(offset + number)
            submitted.append(record["id"])
            writer.submit(record)

    threads = [threading.Thread(target=client, args=(1000 * i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    writer.close()
    assert {row["id"] for row in records.iterate(page=37)} == set(submitted)
    assert len(set(submitted)) == 200
