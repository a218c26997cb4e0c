"""The inspections table.

One row per decision, written once. Only the review columns (`review_*`, `added_to`) ever
change afterwards: what was decided, on which image, by which model versions stays as it
was, so a replay can check it and an audit can trust it. The review columns hold the latest
review; every review, with the label it replaced, is also a row of `reviews`, which is only
ever appended to. Migrations in migrations/versions create exactly these tables;
`test_records` checks the two agree.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import time
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Boolean, DateTime, Float, Index, Integer, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

REVIEW_LABELS = ("false_alarm", "confirmed_defect", "unsure")
# The columns a review may write; every other column is fixed once the record exists.
REVIEW_COLUMNS = ("review_label", "review_note", "reviewed_by", "reviewed_at", "added_to")


def new_record_id() -> str:
    """Time-ordered and unique without the database: ids sort by creation time, so they
    are the paging cursor, and a record spooled while the database was down keeps its id
    (written twice, it is still one row)."""
    return f"{time.time_ns():016x}{secrets.token_hex(4)}{os.getpid() % 256:02x}"


def utc_now() -> datetime:
    return datetime.now(UTC)


def make_record(
    *,
    product: str,
    image: bytes,
    result: dict[str, Any],
    backbone_model: str,
    bank_model: str,
    settings_hash: str,
    source: str,
    latency_ms: float | None = None,
    caller: str | None = None,
    name: str | None = None,
) -> dict[str, Any]:
    """A new record of one decision (`result` holds the schema's RESULT_FIELDS), the one
    place a record's fields are filled in, for the service and the batch job alike."""
    return {
        "id": new_record_id(),
        "created_at": utc_now(),
        "source": source,
        "product": product,
        "image_sha256": hashlib.sha256(image).hexdigest(),
        "image_bytes": len(image),
        "image_width": int(result["image_width"]),
        "image_height": int(result["image_height"]),
        "image_name": name,
        "score": float(result["score"]),
        "threshold": float(result["threshold"]),
        "is_anomalous": bool(result["is_anomalous"]),
        "backbone_model": backbone_model,
        "bank_model": bank_model,
        "settings_hash": settings_hash,
        "latency_ms": latency_ms,
        "api_key_id": caller,
    }


class Base(DeclarativeBase):
    pass


class Inspection(Base):
    __tablename__ = "inspections"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    source: Mapped[str] = mapped_column(String(16))  # service | batch
    product: Mapped[str] = mapped_column(String(64))
    image_sha256: Mapped[str] = mapped_column(String(64), index=True)
    image_bytes: Mapped[int] = mapped_column(Integer)
    image_width: Mapped[int] = mapped_column(Integer)
    image_height: Mapped[int] = mapped_column(Integer)
    image_name: Mapped[str | None] = mapped_column(String(512))  # a batch job's relative path
    image_kept: Mapped[bool] = mapped_column(Boolean)  # stored when recorded (retention may end it)
    score: Mapped[float] = mapped_column(Float)
    threshold: Mapped[float] = mapped_column(Float)
    is_anomalous: Mapped[bool] = mapped_column(Boolean)
    backbone_model: Mapped[str] = mapped_column(String(200))
    bank_model: Mapped[str] = mapped_column(String(200))
    settings_hash: Mapped[str] = mapped_column(String(16))
    latency_ms: Mapped[float | None] = mapped_column(Float)
    api_key_id: Mapped[str | None] = mapped_column(String(64))  # the key's name, never the key
    review_label: Mapped[str | None] = mapped_column(String(20))
    review_note: Mapped[str | None] = mapped_column(Text)
    reviewed_by: Mapped[str | None] = mapped_column(String(128))
    reviewed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    added_to: Mapped[str | None] = mapped_column(String(200))  # bank version made from it

    __table_args__ = (
        Index("ix_inspections_product_id", "product", "id"),
        Index("ix_inspections_review", "review_label", "is_anomalous"),
    )


class Review(Base):
    """One review of one record, as it was made: never updated or deleted."""

    __tablename__ = "reviews"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    record_id: Mapped[str] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    label: Mapped[str] = mapped_column(String(20))
    previous_label: Mapped[str | None] = mapped_column(String(20))
    note: Mapped[str | None] = mapped_column(Text)
    reviewer: Mapped[str | None] = mapped_column(String(128))  # the key's name

    __table_args__ = (Index("ix_reviews_record_id", "record_id", "id"),)
