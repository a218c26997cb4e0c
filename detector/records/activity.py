"""A line's last hours at a glance, from the records: inspections and flags per hour, today's
count and the alarms nobody has reviewed yet, per product (the page's overview).

Hours are counted with one small query each (portable SQL: no dialect's date functions),
on the indexed `created_at`; open reviews on the review index.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select

from detector.records.model import Inspection, utc_now
from detector.records.store import RecordStore

HOURS = 24


def activity(store: RecordStore, now: datetime | None = None, hours: int = HOURS) -> dict[str, Any]:
    """Per product: `hours` hourly buckets ending with the current hour, inspections since
    midnight UTC, and flagged records not yet reviewed (of every kept record)."""
    now = now or utc_now()
    first = now.replace(minute=0, second=0, microsecond=0) - timedelta(hours=hours - 1)
    midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
    starts = [first + timedelta(hours=hour) for hour in range(hours)]
    products: dict[str, dict[str, Any]] = {}

    def entry(product: str) -> dict[str, Any]:
        if product not in products:
            products[product] = {
                "hours": [
                    {"start": start.isoformat(), "inspections": 0, "flagged": 0} for start in starts
                ],
                "inspections_today": 0,
                "flagged_today": 0,
                "open_reviews": 0,
            }
        return products[product]

    counted = (Inspection.product, Inspection.is_anomalous, func.count())
    grouped = (Inspection.product, Inspection.is_anomalous)
    with store.engine.connect() as connection:
        for position, start in enumerate(starts):
            window = (
                Inspection.created_at >= start,
                Inspection.created_at < start + timedelta(hours=1),
            )
            for product, flagged, count in connection.execute(
                select(*counted).where(*window).group_by(*grouped)
            ):
                bucket = entry(product)["hours"][position]
                bucket["inspections"] += count
                bucket["flagged"] += count if flagged else 0
        today = select(*counted).where(Inspection.created_at >= midnight).group_by(*grouped)
        for product, flagged, count in connection.execute(today):
            entry(product)["inspections_today"] += count
            entry(product)["flagged_today"] += count if flagged else 0
        waiting = (
            select(Inspection.product, func.count())
            .where(Inspection.is_anomalous.is_(True), Inspection.review_label.is_(None))
            .group_by(Inspection.product)
        )
        for product, count in connection.execute(waiting):
            entry(product)["open_reviews"] = count
    return {"since": first.isoformat(), "hours": hours, "products": products}
