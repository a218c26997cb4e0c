"""What a records request can be refused with; each error says why, and `status`/`reason`
what an HTTP client gets."""

from __future__ import annotations

from detector.errors import UserError


class RecordsError(UserError):
    """A records request that cannot be answered as asked; the message says why, and
    `status`/`reason` what an HTTP client gets."""

    status, reason = 400, "bad_request"


class RecordNotFound(RecordsError):
    status, reason = 404, "unknown_record"


class ImageGone(RecordsError):
    """The record exists but its image was never kept or retention removed it."""

    status, reason = 410, "image_gone"
