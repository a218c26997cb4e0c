"""Inspection records: every decision the service (or a batch job with --record) made, in a
database, with the reviews operators give them and the images they were made on.

    model.py       the table, as SQLAlchemy sees it
    migrations/    the same table as Alembic migrations: how a database gets there
    store.py       writes, reads and the one update records allow (their review)
    query.py       which records a page lists, its times and its cursor
    errors.py      what a records request can be refused with
    suggest.py     the threshold the reviewed records suggest, and applying it
    writer.py      writes off the request path, spooling to disk while the database is down
    images.py      the content-addressed image folder and its retention
    replay.py      rescoring stored images with the recorded model versions (audit)
    export.py      reviewed images in the MVTec AD layout, for `detector evaluate`
"""
