"""Alembic's environment for the records database.

Run from code (`RecordStore.migrate`: the service at start, `python -m detector
migrate-records`), which hands over an open connection; otherwise the URL comes from
`sqlalchemy.url` or INSPECT_RECORDS_DB.
"""

from __future__ import annotations

import os

from alembic import context
from sqlalchemy import create_engine

from detector.records.model import Base

config = context.config
target_metadata = Base.metadata


def run_migrations_offline() -> None:
    url = config.get_main_option("sqlalchemy.url") or os.environ["INSPECT_RECORDS_DB"]
    context.configure(url=url, target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        context.configure(connection=connection, target_metadata=target_metadata)
        with context.begin_transaction():
            context.run_migrations()
        return
    url = config.get_main_option("sqlalchemy.url") or os.environ["INSPECT_RECORDS_DB"]
    with create_engine(url).connect() as opened:
        context.configure(connection=opened, target_metadata=target_metadata)
        with context.begin_transaction():
            context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
