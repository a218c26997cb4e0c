"""Which records to list and how a page of them reads: the query, its times and its
cursor, and a row as JSON-ready values."""

from __future__ import annotations

import base64
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from detector.records.errors import RecordsError
from detector.records.model import REVIEW_LABELS

MAX_PAGE = 500


def parse_time(name: str, value: str | None) -> datetime | None:
    """An ISO 8601 time from a query or a flag; a time without a zone is UTC."""
    if not value:
        return None
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise RecordsError(f"{name} must be an ISO 8601 time, e.g. 2026-11-29T08:00:00Z.") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


@dataclass(frozen=True)
class RecordQuery:
    """Which records to list, newest first; `cursor` is the last id of the previous page."""

    product: str | None = None
    verdict: str | None = None  # anomalous | normal
    reviewed: bool | None = None
    label: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    cursor: str | None = None
    limit: int = 50

    def __post_init__(self) -> None:
        if not 1 <= self.limit <= MAX_PAGE:
            raise RecordsError(f"limit must be between 1 and {MAX_PAGE}; it was {self.limit}.")
        if self.verdict not in (None, "anomalous", "normal"):
            raise RecordsError("verdict must be 'anomalous' or 'normal'.")
        if self.label is not None and self.label not in REVIEW_LABELS:
            raise RecordsError(f"label must be one of {', '.join(REVIEW_LABELS)}.")
        if self.since and self.until and self.since > self.until:
            raise RecordsError("since must not be after until.")


def as_utc(moment: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes; every time here is UTC."""
    if moment is None or moment.tzinfo is not None:
        return moment
    return moment.replace(tzinfo=UTC)


def record_dict(row: Any) -> dict[str, Any]:
    """A row of the table as JSON-ready values, with its verdict spelled out."""
    document = dict(row._mapping)
    for name in ("created_at", "reviewed_at"):
        moment = as_utc(document[name])
        document[name] = moment.isoformat() if moment else None
    document["verdict"] = "anomalous" if document["is_anomalous"] else "normal"
    return document


def encode_cursor(record_id: str) -> str:
    return base64.urlsafe_b64encode(record_id.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> str:
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        value = base64.urlsafe_b64decode(padded.encode()).decode()
    except (ValueError, UnicodeDecodeError):
        raise RecordsError("cursor is not one this service gave out.") from None
    if not value or len(value) > 32 or not value.isalnum():
        raise RecordsError("cursor is not one this service gave out.")
    return value
