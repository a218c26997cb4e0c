"""What every answer is: the one way the API refuses a request, `Refusal` (status, a reason
word, a sentence), sent as the one error body {"error": the sentence, "reason": the word};
and the headers every answer carries, so browsers neither sniff types nor frame the service."""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from detector import schema
from detector.errors import UserError
from detector.images import InvalidImageError

Message = MutableMapping[str, Any]
Send = Callable[[Message], Awaitable[None]]
log = logging.getLogger("inspection")
RUNNER_DOWN = "The scoring runner is not reachable; retry shortly (see the server log)."
RECORDS_DOWN = "The records database is not reachable; retry shortly (see the server log)."
INTERNAL = "The service could not answer this request (the server log says why)."
SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
]


class Refusal(Exception):
    """A request answered with an error instead of a result; `headers` go with the answer
    (Retry-After)."""

    def __init__(self, status: int, reason: str, message: str, **headers: str) -> None:
        super().__init__(message)
        self.status, self.reason, self.message, self.headers = status, reason, message, headers

    def body(self) -> dict[str, str]:
        """The one error body."""
        return dict(zip(schema.ERROR_FIELDS, (self.message, self.reason), strict=True))

    def as_answer(self) -> dict[str, Any]:
        """The runner's form (a plain dict crosses the process boundary): body and status."""
        return {**self.body(), "status": self.status}


def refusal(error: BaseException) -> Refusal:
    """The refusal an exception stands for, the one mapping from errors to answers: a
    user's mistake its own `status` and `reason` (UserError, InvalidImageError), the runner
    or the records database out of reach a 503; anything else a 500 with a sentence, the
    traceback in the log, never in the answer."""
    if isinstance(error, Refusal):
        return error
    if isinstance(error, UserError | InvalidImageError):
        return Refusal(error.status, error.reason, str(error))
    import aiohttp  # the API process has both; the runner never gets here with them
    from sqlalchemy.exc import SQLAlchemyError

    if isinstance(error, aiohttp.ClientConnectionError):
        return Refusal(503, "runner_unavailable", RUNNER_DOWN)
    if isinstance(error, SQLAlchemyError):
        log.warning("records database error: %s", type(error).__name__)
        return Refusal(503, "records_unavailable", RECORDS_DOWN)
    log.error("unexpected error answering a request", exc_info=error)
    return Refusal(500, "internal_error", INTERNAL)


async def send_error(send: Send, refusal: Refusal) -> None:
    """A refusal as a raw ASGI answer (the gate answers before any framework runs)."""
    body = json.dumps(refusal.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    headers += [(k.lower().encode(), v.encode()) for k, v in refusal.headers.items()]
    await send({"type": "http.response.start", "status": refusal.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def with_security_headers(send: Send) -> Send:
    async def sending(message: Message) -> None:
        if message["type"] == "http.response.start":
            present = {name.lower() for name, _ in message.get("headers", [])}
            extra = [(name, value) for name, value in SECURITY_HEADERS if name not in present]
            message["headers"] = [*message.get("headers", []), *extra]
        await send(message)

    return sending


def refused_answer(runner_answer: dict[str, Any]) -> dict[str, Any]:
    """The runner's answer for one upload, or the refusal its decode raised."""
    if "error" in runner_answer:
        headers = (
            {"Retry-After": str(runner_answer["retry_after"])}
            if runner_answer.get("retry_after")
            else {}
        )
        raise Refusal(
            runner_answer["status"], runner_answer["reason"], runner_answer["error"], **headers
        )
    return runner_answer


def refuse_explain_below_reviewer(explain: bool, role: str | None) -> None:
    """An explanation shows crops of the bank's training images and names its images and
    records: what a reviewer may read (its history, the records), never a line key or a
    caller without one, whatever is configured."""
    if not explain:
        return
    from detector.serving.access import allows

    if role is None:
        raise Refusal(401, "unauthorised", "explain=true needs an API key with the reviewer role.")
    if not allows(role, "reviewer"):
        raise Refusal(
            403,
            "forbidden",
            f"explain=true shows patches of the product's training images and its records: "
            f"it needs the reviewer role (this key has the {role} role).",
        )
