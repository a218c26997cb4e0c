"""Inspection records in a real database: SQLite always, PostgreSQL where it is installed.

In-process tests of the store and the writer run against both; the served tests (review
queue, bank changes from reviews, replay, export, outages) are in test_review.py.
"""

from __future__ import annotations

import hashlib
import io
import sqlite3
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import inspect as schema_of

from detector.records.errors import RecordNotFound, RecordsError
from detector.records.images import ImageStore
from detector.records.model import REVIEW_COLUMNS, Inspection, Review, new_record_id, utc_now
from detector.records.query import RecordQuery, decode_cursor
from detector.records.store import RecordStore
from detector.records.writer import RecordWriter
from detector.serving.records import query_from


def picture(number: int, side: int = 8) -> bytes:
    """A small, distinct, decodable PNG (what the writer keeps must be an image)."""
    rng = np.random.default_rng(number)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


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
    migrated = {column["name"]: column["nullable"] for column in table.get_columns("reviews")}
    assert migrated == {column.name: column.nullable for column in Review.__table__.columns}
    assert {i.name for i in Review.__table__.indexes} <= {
        i["name"] for i in table.get_indexes("reviews")
    }
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
    # A later review by another key replaces the latest one, and both stay in the history.
    records.review(batch[0]["id"], "confirmed_defect", "no: a stain", "desk")
    history = records.reviews(batch[0]["id"])
    assert [(r["previous_label"], r["label"], r["reviewer"], r["note"]) for r in history] == [
        (None, "false_alarm", "ann / line3", "shadow of the gantry"),
        ("false_alarm", "confirmed_defect", "desk", "no: a stain"),
    ]
    assert records.get(batch[0]["id"])["review_label"] == "confirmed_defect"
    assert records.reviews(batch[2]["id"]) == [], "a refused review leaves no history"


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
            assert writer.submit(submitted[-1], picture(number))
        assert writer.flush()
        begin()
        try:
            for number in range(20, 60):
                submitted.append(a_record(number))
                assert writer.submit(submitted[-1], picture(number))  # queued, not waited
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
    from devtools.local_server import free_port

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
    import os

    images = [picture(number) for number in range(5)]
    hashes = [hashlib.sha256(data).hexdigest() for data in images]
    store = ImageStore(tmp_path, keep="flagged", max_age_days=1, max_mb=10**6)
    assert store.wants(True) and not store.wants(False)
    now = time.time()
    for age_days, sha, data in zip((3, 0.5, 0.4, 0.3, 0.2), hashes, images, strict=True):
        assert store.put(sha, data) is True
        moment = now - age_days * 86400
        os.utime(store.path(sha), (moment, moment))
    sizes = [store.size(sha) for sha in hashes]
    store.max_bytes = sum(sizes[2:])  # room for the three newest
    pruned = store.prune(now)
    # The 3-day-old image by age, then the oldest until the rest fits.
    assert pruned.removed == 2 and pruned.freed_bytes == sum(sizes[:2])
    assert [store.available(sha) for sha in hashes] == [False, False, True, True, True]
    assert store.put(hashes[2], images[2]) is False  # stored again: kept, its age reset
    assert store.path(hashes[2]).stat().st_mtime > now - 60
    assert store.get("not a hash") is None and not store.available("../../etc/passwd")


def test_kept_images_are_the_scored_pixels_and_the_cap_holds_when_writing(
    tmp_path: Path,
) -> None:
    """An upload with 45 MB hidden after its end, or in a metadata chunk, keeps only its
    pixels; a folder at its cap makes room before writing, never after."""
    from PIL import PngImagePlugin

    base = picture(1, side=32)
    stuffed = base + b"\0" * (5 << 20)  # bytes after the image's end
    meta = PngImagePlugin.PngInfo()
    meta.add_text("junk", "x" * (2 << 20))
    with_chunk = io.BytesIO()
    Image.open(io.BytesIO(picture(2, side=32))).save(with_chunk, "PNG", pnginfo=meta)
    store = ImageStore(tmp_path / "images", keep="all", max_mb=1)
    for data in (stuffed, with_chunk.getvalue()):
        sha = hashlib.sha256(data).hexdigest()
        assert store.put(sha, data) is True
        kept = store.get(sha)
        assert len(kept) < 10_000, "the pixels, not the payload"
        assert np.array_equal(
            np.asarray(Image.open(io.BytesIO(kept)).convert("RGB")),
            np.asarray(Image.open(io.BytesIO(data)).convert("RGB")),
        )
    assert store.put("a" * 64, b"not an image at all") is None
    # Fill past the cap: the folder never holds more than the cap at any moment.
    for number in range(200):
        data = picture(100 + number, side=96)  # ~28 kB of noise each
        store.put(hashlib.sha256(data).hexdigest(), data)
        on_disk = sum(f.stat().st_size for f in (tmp_path / "images").rglob("*") if f.is_file())
        assert on_disk <= store.max_bytes
    big = picture(7, side=700)  # a single image larger than the whole cap is not kept
    assert store.put(hashlib.sha256(big).hexdigest(), big) is None


def test_a_dropped_record_keeps_no_image_and_queued_images_are_bounded(tmp_path: Path) -> None:
    from devtools.local_server import free_port

    store = RecordStore(f"postgresql+psycopg://nobody@127.0.0.1:{free_port()}/none")
    images = ImageStore(tmp_path / "images", keep="all")
    counts: dict[str, int] = {}
    writer = RecordWriter(
        store,
        tmp_path / "spool",
        images,
        spool_max_bytes=1,  # every batch is dropped
        flush_s=0.01,
        max_queued_image_bytes=1,  # and, below, no image fits the queue
        prepare=store.migrate,
        on_count=lambda outcome, n: counts.__setitem__(outcome, counts.get(outcome, 0) + n),
    )
    writer.max_queued_image_bytes = 1 << 20
    for number in range(5):
        data = picture(number)
        writer.submit(a_record(number, image_sha256=hashlib.sha256(data).hexdigest()), data)
        writer.flush()
    assert counts["dropped"] == 5
    assert not [f for f in (tmp_path / "images").rglob("*") if f.is_file()], "no orphan images"
    writer.max_queued_image_bytes = 10
    assert writer.submit(a_record(9), picture(9))
    writer.close()
    assert counts["image_not_kept"] == 1
    store.close()


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


def test_a_records_volume_this_user_cannot_restrict_keeps_images_private(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In a pod the records folder is a volume owned by root: chmod fails for the service's
    user. Recording stays on; the folders that hold images are made private instead."""
    from detector.records.recording import private_folder

    volume = tmp_path / "records"
    volume.mkdir(mode=0o777)
    original = Path.chmod

    def not_ours(path: Path, mode: int, **kwargs: object) -> None:
        if path == volume:
            raise PermissionError(1, "Operation not permitted", str(path))
        original(path, mode, **kwargs)

    monkeypatch.setattr(Path, "chmod", not_ours)
    private_folder(volume)
    for inner in ("images", "spool"):
        assert (volume / inner).stat().st_mode & 0o777 == 0o700


def test_the_batch_job_opens_its_records_as_the_service_does(tmp_path: Path) -> None:
    """One opener for both writers: a records folder a batch job creates is as private as
    the service's, and its own spool keeps its records apart."""
    from batch.records import BatchRecorder

    folder = tmp_path / "records"
    recorder = BatchRecorder(tmp_path, str(folder), None, "flagged", "carpet", "0" * 16)
    try:
        assert folder.stat().st_mode & 0o777 == 0o700
        assert recorder.writer.spool_dir == folder / "spool-batch"
        assert recorder.images.root == folder / "images"
    finally:
        assert not any(recorder.close().values()), "nothing was recorded"
