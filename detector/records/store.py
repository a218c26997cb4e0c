"""The records database: open it, bring its schema up to date, write, query, review.

Any SQLAlchemy URL works; the default is an embedded SQLite file that needs no set-up
(`default_url`). A URL's password never appears in a message or a log line (`safe_url`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, and_, create_engine, event, func, select, update
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from detector.files import exclusive
from detector.records.errors import RecordNotFound, RecordsError
from detector.records.model import REVIEW_LABELS, Inspection, Review, utc_now
from detector.records.query import RecordQuery, as_utc, decode_cursor, encode_cursor, record_dict

log = logging.getLogger("inspection.records")
MIGRATIONS = Path(__file__).parent / "migrations"


def default_url(records_dir: Path) -> str:
    return f"sqlite:///{records_dir / 'records.sqlite'}"


def locate_records(folder: str | None, url: str | None) -> tuple[Path, str]:
    """(records folder, database URL): the folder defaults to <BENTOML_HOME>/records, beside
    the model store whose versions the records name; the database to SQLite in it."""
    if folder:
        path = Path(folder)
    else:
        from bentoml._internal.configuration.containers import BentoMLContainer

        path = Path(BentoMLContainer.bentoml_home.get()) / "records"
    return path, url or default_url(path)


def safe_url(url: str) -> str:
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "(an unparsable URL)"


TABLE = Inspection.__table__


class RecordStore:
    """One database of records. Thread-safe: each call takes its own pooled connection."""

    def __init__(self, url: str, connect_timeout_s: float = 5.0) -> None:
        self.url = url
        parsed = make_url(url)
        self.is_sqlite = parsed.get_backend_name() == "sqlite"
        if self.is_sqlite:
            if parsed.database and parsed.database != ":memory:":
                Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
            self.engine: Engine = create_engine(
                url, connect_args={"timeout": connect_timeout_s, "check_same_thread": False}
            )
            event.listen(self.engine, "connect", _sqlite_pragmas)
        else:
            connect_args = {"connect_timeout": max(1, int(connect_timeout_s))}
            if parsed.get_backend_name() != "postgresql":
                connect_args = {}
            self.engine = create_engine(url, pool_pre_ping=True, connect_args=connect_args)

    def __repr__(self) -> str:
        return f"RecordStore({safe_url(self.url)})"

    def close(self) -> None:
        self.engine.dispose()

    # ----- schema --------------------------------------------------------------------
    def _alembic(self, connection: Any) -> Any:
        from alembic.config import Config

        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS))
        config.attributes["connection"] = connection
        return config

    def revisions(self) -> tuple[str | None, str]:
        """(the database's schema revision, the newest this code ships)."""
        from alembic.runtime.migration import MigrationContext
        from alembic.script import ScriptDirectory

        with self.engine.connect() as connection:
            current = MigrationContext.configure(connection).get_current_revision()
            head = ScriptDirectory.from_config(self._alembic(connection)).get_current_head()
        return current, str(head)

    def migrate(self) -> None:
        """Apply the migrations this database lacks (none, when it is up to date)."""
        from alembic import command

        with self.engine.begin() as connection:
            command.upgrade(self._alembic(connection), "head")

    def check(self) -> None:
        """Refuse a database whose schema is not the one this code writes."""
        current, head = self.revisions()
        if current != head:
            raise RecordsError(
                f"The records database {safe_url(self.url)} is at schema revision {current}; "
                f"this version needs {head}: run `python -m detector migrate-records` "
                "(or set INSPECT_RECORDS_MIGRATE=apply)."
            )

    # ----- writing -------------------------------------------------------------------
    def insert(self, records: list[dict[str, Any]]) -> int:
        """Write records that are not there yet; returns how many were new.

        A batch written again (spooled, then the process stopped before it could forget
        it) adds nothing twice: ids already present are skipped.
        """
        if not records:
            return 0
        ids = [record["id"] for record in records]
        with self.engine.begin() as connection:
            present = set(
                connection.execute(select(Inspection.id).where(Inspection.id.in_(ids))).scalars()
            )
            new = [_row(record) for record in records if record["id"] not in present]
            if new:
                connection.execute(TABLE.insert(), new)
        return len(new)

    def review(
        self, record_id: str, label: str, note: str | None, reviewer: str | None
    ) -> dict[str, Any]:
        """Set a record's latest review and append it to the record's history, in one
        transaction (the row is locked, so two reviewers at once are both in the history,
        each with the label it replaced)."""
        if label not in REVIEW_LABELS:
            raise RecordsError(f"label must be one of {', '.join(REVIEW_LABELS)}; not {label!r}.")
        now = utc_now()
        note = (note or None) and note[:2000]
        with self.engine.begin() as connection:
            current = connection.execute(
                select(Inspection.review_label).where(Inspection.id == record_id).with_for_update()
            ).first()
            if current is None:
                raise RecordNotFound(f"No record {record_id!r}.")
            connection.execute(
                update(Inspection)
                .where(Inspection.id == record_id)
                .values(review_label=label, review_note=note, reviewed_by=reviewer, reviewed_at=now)
            )
            connection.execute(
                Review.__table__.insert(),
                {
                    "record_id": record_id,
                    "created_at": now,
                    "label": label,
                    "previous_label": current[0],
                    "note": note,
                    "reviewer": reviewer,
                },
            )
        return self.get(record_id)

    def reviews(self, record_id: str) -> list[dict[str, Any]]:
        """A record's reviews, oldest first."""
        statement = (
            select(Review.__table__).where(Review.record_id == record_id).order_by(Review.id)
        )
        with self.engine.connect() as connection:
            rows = [dict(row._mapping) for row in connection.execute(statement)]
        for row in rows:
            row["created_at"] = as_utc(row["created_at"]).isoformat()
            row.pop("record_id")
        return rows

    def mark_added(self, record_ids: list[str], bank_tag: str) -> None:
        """The bank version these records' images went into (a review field)."""
        with self.engine.begin() as connection:
            connection.execute(
                update(Inspection).where(Inspection.id.in_(record_ids)).values(added_to=bank_tag)
            )

    # ----- reading -------------------------------------------------------------------
    def get(self, record_id: str) -> dict[str, Any]:
        with self.engine.connect() as connection:
            row = connection.execute(select(TABLE).where(Inspection.id == record_id)).first()
        if row is None:
            raise RecordNotFound(f"No record {record_id!r}.")
        return record_dict(row)

    def list(self, query: RecordQuery) -> tuple[list[dict[str, Any]], str | None]:
        """A page of records, newest first, and the cursor of the next page (None: last)."""
        conditions = []
        if query.product:
            conditions.append(Inspection.product == query.product)
        if query.verdict:
            conditions.append(Inspection.is_anomalous.is_(query.verdict == "anomalous"))
        if query.reviewed is not None:
            reviewed = Inspection.review_label.is_not(None)
            conditions.append(reviewed if query.reviewed else Inspection.review_label.is_(None))
        if query.label:
            conditions.append(Inspection.review_label == query.label)
        if query.since:
            conditions.append(Inspection.created_at >= query.since)
        if query.until:
            conditions.append(Inspection.created_at <= query.until)
        if query.cursor:
            conditions.append(Inspection.id < decode_cursor(query.cursor))
        statement = (
            select(TABLE)
            .where(and_(True, *conditions))
            .order_by(Inspection.id.desc())
            .limit(query.limit + 1)
        )
        with self.engine.connect() as connection:
            rows = [record_dict(row) for row in connection.execute(statement)]
        more = len(rows) > query.limit
        rows = rows[: query.limit]
        return rows, encode_cursor(rows[-1]["id"]) if more and rows else None

    def iterate(
        self,
        since: datetime | None = None,
        product: str | None = None,
        reviewed_only: bool = False,
        bank_models: list[str] | None = None,
        page: int = 500,
    ) -> Iterator[dict[str, Any]]:
        """Every record matching, oldest first, a page at a time (replay, export, the
        threshold suggestion)."""
        last = ""
        while True:
            conditions = [Inspection.id > last]
            if since:
                conditions.append(Inspection.created_at >= since)
            if product:
                conditions.append(Inspection.product == product)
            if reviewed_only:
                conditions.append(Inspection.review_label.is_not(None))
            if bank_models is not None:
                conditions.append(Inspection.bank_model.in_(bank_models))
            statement = select(TABLE).where(and_(*conditions)).order_by(Inspection.id).limit(page)
            with self.engine.connect() as connection:
                rows = [record_dict(row) for row in connection.execute(statement)]
            yield from rows
            if len(rows) < page:
                return
            last = rows[-1]["id"]

    def counts_by_bank(self, since: datetime | None, product: str) -> dict[str, int]:
        """A product's records per bank version since `since` (what a suggestion on one
        scale leaves out of the others), counted by the database."""
        statement = select(Inspection.bank_model, func.count()).where(Inspection.product == product)
        if since:
            statement = statement.where(Inspection.created_at >= since)
        statement = statement.group_by(Inspection.bank_model)
        with self.engine.connect() as connection:
            return {str(tag): int(count) for tag, count in connection.execute(statement)}

    def review_summary(self, since: datetime | None = None) -> dict[str, dict[str, int]]:
        """Per product: reviewed records by label, and of flagged ones by label."""
        statement = select(
            Inspection.product, Inspection.is_anomalous, Inspection.review_label, func.count()
        ).where(Inspection.review_label.is_not(None))
        if since:
            statement = statement.where(Inspection.reviewed_at >= since)
        statement = statement.group_by(
            Inspection.product, Inspection.is_anomalous, Inspection.review_label
        )
        summary: dict[str, dict[str, int]] = {}
        with self.engine.connect() as connection:
            for product, flagged, label, count in connection.execute(statement):
                counts = summary.setdefault(product, {})
                counts[label] = counts.get(label, 0) + count
                if flagged:
                    key = f"flagged_{label}"
                    counts[key] = counts.get(key, 0) + count
        return summary

    def count(self) -> int:
        with self.engine.connect() as connection:
            return int(connection.execute(select(func.count()).select_from(Inspection)).scalar())


def _sqlite_pragmas(connection: Any, _: Any) -> None:
    """WAL: the service's writer and the readers of /records do not block each other."""
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


_COLUMNS = {column.name for column in TABLE.columns}


def _row(record: dict[str, Any]) -> dict[str, Any]:
    """A record as the table takes it: known columns only, times as datetimes."""
    values = {key: value for key, value in record.items() if key in _COLUMNS}
    for name in ("created_at", "reviewed_at"):
        if isinstance(values.get(name), str):
            values[name] = datetime.fromisoformat(values[name])
    return values


def spooled_line(record: dict[str, Any]) -> str:
    return json.dumps(record, default=_json_default)


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON")


__all__ = ["RecordQuery", "RecordStore", "RecordsError", "RecordNotFound", "SQLAlchemyError"]


def migrate_database(store: RecordStore, folder: Path) -> None:
    """Apply the migrations the database lacks, under a file lock so that the service's
    workers (and a batch job or `migrate-records` run) migrate one at a time; a database
    that does not answer is migrated later, by the writer, once it does."""
    from sqlalchemy.exc import OperationalError

    folder.mkdir(parents=True, exist_ok=True)
    try:
        with exclusive(folder / ".migrate.lock"):
            store.migrate()
    except OperationalError as error:
        unreachable(store, error)


def unreachable(store: RecordStore, error: Exception) -> None:
    cause = getattr(error, "orig", None)
    log.warning(
        "records database %s does not answer (%s); records are spooled until it does",
        safe_url(store.url),
        type(cause or error).__name__,
    )
