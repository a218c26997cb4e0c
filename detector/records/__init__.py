"""Inspection records: every decision the service (or a batch job with --record) made, in a
database, with the reviews operators give them and the images they were made on.

    model.py       the table, as SQLAlchemy sees it
    migrations/    the same table as Alembic migrations: how a database gets there
    store.py       queries and the one update records allow (their review)
    writer.py      writes off the request path, spooling to disk while the database is down
    images.py      the content-addressed image folder and its retention
    replay.py      rescoring stored images with the recorded model versions (audit)
    export.py      reviewed images in the MVTec AD layout, for `detector evaluate`
"""
