"""What a request must pass before BentoML reads its body: key, size, queue, upload shape.

BentoML parses a whole multipart body (into memory, then a temp file) before an API method
runs, so checks in the method come too late: an anonymous 300 MB upload raised the API's
RSS by 300 MB. This ASGI middleware runs first, in this order:

1. the API key, for every endpoint that scores or reveals models or records (health,
   /metrics and the web page stay open); a bank change under /products needs
   `INSPECT_ADMIN_KEY` when one is set, else an API key. The name of the key that matched
   (never the key) is left in the request's scope for its record;
2. the declared size (Content-Length) against the endpoint's limit;
3. the queue: beyond `INSPECT_MAX_QUEUE` images in flight (an /inspect_batch request counts
   its images once its parts are read), 503 with Retry-After;
4. the body, streamed into a spooled file (1 MiB in memory, the rest on disk) and counted as
   it arrives, so a chunked upload without a length is cut at the limit too; its multipart
   parts are read as they stream: an image field must be a file (a text field with a URL
   would make BentoML download it), and /inspect_batch may carry at most
   `INSPECT_MAX_BATCH_FILES` files.

Only then is the body replayed to BentoML. Answering early costs nothing: uvicorn discards
the rest of a body once the response is complete.
"""

from __future__ import annotations

import hmac
import json
import tempfile
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

from python_multipart.multipart import MultipartParser, parse_options_header

from detector.serving import telemetry
from detector.serving.settings import Settings

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
SPOOL_IN_MEMORY = 1 << 20
SMALL_BODY = 64 * 1024  # JSON bodies of /drift, /model_info
MULTIPART_OVERHEAD = 64 * 1024  # boundaries, part headers and text fields around one file


class Refusal(Exception):
    def __init__(self, status: int, reason: str, message: str, **headers: str) -> None:
        super().__init__(message)
        self.status, self.reason, self.message, self.headers = status, reason, message, headers


@dataclass(frozen=True)
class Rule:
    """What one endpoint accepts."""

    max_body: int
    file_fields: frozenset[str] = frozenset()  # multipart fields that must be file uploads
    max_files: int | None = None
    queued: bool = False  # counts against INSPECT_MAX_QUEUE (it waits for the runner)
    admin: bool = False  # changes a bank: the admin key when one is set


PRODUCT_ACTIONS = ("history", "rollback", "images", "threshold", "suggestion")
RECORD_ACTIONS = ("image", "heatmap", "review")
CALLER_SCOPE_KEY = "inspection.caller"


def rules(settings: Settings) -> dict[str, Rule]:
    one_image = settings.max_bytes + MULTIPART_OVERHEAD
    image = frozenset({"image"})
    return {
        "/inspect": Rule(one_image, image, max_files=1, queued=True),
        "/heatmap": Rule(one_image, image, max_files=1, queued=True),
        "/inspect_batch": Rule(
            settings.max_batch_bytes + MULTIPART_OVERHEAD,
            frozenset({"images"}),
            max_files=settings.max_batch_files,
            queued=True,
        ),
        "/drift": Rule(SMALL_BODY),
        "/model_info": Rule(SMALL_BODY),
        "/products/": Rule(SMALL_BODY),
        "/products/*/history": Rule(SMALL_BODY),
        "/products/*/rollback": Rule(SMALL_BODY, admin=True),
        "/products/*/threshold": Rule(SMALL_BODY, admin=True),
        "/products/*/suggestion": Rule(SMALL_BODY),
        "/products/*/images": Rule(
            settings.max_batch_bytes + MULTIPART_OVERHEAD,
            frozenset({"images", "calibration_images"}),
            max_files=settings.max_batch_files,
            queued=True,
            admin=True,
        ),
        "/records/": Rule(SMALL_BODY),
        "/records/*": Rule(SMALL_BODY),
        "/records/*/image": Rule(SMALL_BODY),
        "/records/*/heatmap": Rule(SMALL_BODY),
        "/records/*/review": Rule(SMALL_BODY),
    }


MOUNTED = {"/products": PRODUCT_ACTIONS, "/records": RECORD_ACTIONS}


def rule_key(path: str) -> str:
    """The rules' key for a path. Under a mounted app (/products, /records), PREFIX/NAME/ACTION
    matches PREFIX/*/ACTION, /records/ID matches /records/*, and any other path under it (a
    trailing slash, a typo) the listing's rule, so nothing under it is reached without the
    key."""
    prefix = "/" + path.split("/")[1] if path.count("/") >= 1 else path
    actions = MOUNTED.get(prefix)
    if actions is None or (path != prefix and not path.startswith(prefix + "/")):
        return path
    parts = path.rstrip("/").split("/")
    if len(parts) == 4 and parts[2] and parts[3] in actions:
        return f"{prefix}/*/{parts[3]}"
    if len(parts) == 3 and parts[2] and prefix == "/records" and parts[2] != "summary":
        return "/records/*"
    return f"{prefix}/"


def caller_of(headers: dict[str, str], keys: dict[str, str]) -> str | None:
    """The name of the key the request carries, or None when it carries none of `keys`.
    Every key is compared (in constant time), so the time taken says nothing about which."""
    given = headers.get("x-api-key") or headers.get("authorization", "").removeprefix("Bearer ")
    found = None
    for name, key in keys.items():
        if hmac.compare_digest(given.encode(), key.encode()):
            found = name
    return found


class MultipartShape:
    """Reads part headers as a multipart body streams past; keeps no part data."""

    def __init__(self, content_type: str, rule: Rule) -> None:
        kind, options = parse_options_header(content_type)
        if kind != b"multipart/form-data" or b"boundary" not in options:
            raise Refusal(
                415,
                "not_multipart",
                "Send the image as a multipart/form-data file upload.",
            )
        self.rule = rule
        self.files = 0
        self._header: list[bytes] = []
        self._headers: dict[bytes, bytes] = {}
        callbacks = {
            "on_header_field": self._on_field,
            "on_header_value": self._on_value,
            "on_header_end": self._on_header_end,
            "on_headers_finished": self._on_headers_finished,
        }
        self.parser = MultipartParser(options[b"boundary"], callbacks)

    def _on_field(self, data: bytes, start: int, end: int) -> None:
        self._header = [data[start:end].lower(), b""]

    def _on_value(self, data: bytes, start: int, end: int) -> None:
        self._header[1] += data[start:end]

    def _on_header_end(self) -> None:
        name, value = self._header
        self._headers[name] = value

    def _on_headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        self._headers = {}
        field = options.get(b"name", b"").decode("utf-8", "replace")
        if field not in self.rule.file_fields:
            return
        if b"filename" not in options:
            raise Refusal(
                400,
                "not_a_file",
                f"Field '{field}' must be a file upload; URLs and text are not fetched.",
            )
        self.files += 1
        if self.rule.max_files is not None and self.files > self.rule.max_files:
            raise Refusal(
                413,
                "too_many_files",
                f"At most {self.rule.max_files} images per request.",
            )

    def feed(self, chunk: bytes) -> None:
        self.parser.write(chunk)


class RequestGate:
    """ASGI middleware for the API service (`InspectionAPI.add_asgi_middleware`)."""

    def __init__(self, app: Callable[..., Awaitable[None]], settings: Settings) -> None:
        self.app = app
        self.settings = settings
        self.rules = rules(settings)
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        rule = self.rules.get(rule_key(path)) if scope["type"] == "http" else None
        if rule is None:
            return await self.app(scope, receive, send)
        if path in MOUNTED:  # a mounted app's root, without a redirect
            scope["path"] = path + "/"
            scope["raw_path"] = path.encode() + b"/"
        weight = int(rule.queued and scope.get("method") == "POST")
        try:
            self._check_headers(scope, rule)
            self._admit(weight)
        except Refusal as refusal:
            return await self._refuse(send, refusal)
        self.in_flight += weight
        try:
            try:
                replay, images = await self._read_body(scope, receive, rule)
                if weight and images > 1:  # a batch waits for as many runner turns
                    self.in_flight -= weight
                    weight = 0
                    # A batch above the whole queue is admitted when the queue is empty.
                    images = min(images, self.settings.max_queue)
                    self._admit(images)
                    weight = images
                    self.in_flight += weight
            except Refusal as refusal:
                return await self._refuse(send, refusal)
            await self.app(scope, replay, send)
        finally:
            self.in_flight -= weight

    def _admit(self, images: int) -> None:
        if images and self.in_flight + images > self.settings.max_queue:
            raise Refusal(
                503,
                "overloaded",
                "The service is at capacity; retry after the time in Retry-After.",
                **{"Retry-After": str(self.settings.retry_after_s)},
            )

    def _check_headers(self, scope: Scope, rule: Rule) -> None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        keys = self.settings.admin_keys if rule.admin else self.settings.user_keys
        caller = caller_of(headers, keys or self.settings.user_keys)
        if keys and caller is None:
            which = (
                "admin key (INSPECT_ADMIN_KEY)"
                if rule.admin and self.settings.admin_key
                else "API key"
            )
            raise Refusal(401, "unauthorised", f"Missing or wrong {which}: send it as X-API-Key.")
        # Which key sent the request, by name, for its record (api.caller); never the key.
        scope[CALLER_SCOPE_KEY] = caller
        declared = headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > rule.max_body):
            raise Refusal(
                413, "too_large", f"The request is {declared} bytes; the limit is {rule.max_body}."
            )
        scope["gate.content_type"] = headers.get("content-type", "")

    async def _read_body(self, scope: Scope, receive: Receive, rule: Rule) -> tuple[Receive, int]:
        """Stream the body into a spooled file, counting and shape-checking it as it comes;
        returns a `receive` that replays it, and the number of image files it holds."""
        shape = None
        if rule.file_fields and scope.get("method") == "POST":
            shape = MultipartShape(scope["gate.content_type"], rule)
        spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY)  # noqa: SIM115
        size, more = 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                spool.close()
                raise Refusal(400, "disconnected", "The client went away mid-upload.")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > rule.max_body:
                spool.close()
                raise Refusal(413, "too_large", f"The request exceeds {rule.max_body} bytes.")
            if shape is not None:
                try:
                    shape.feed(chunk)
                except Refusal:
                    spool.close()
                    raise
                except Exception as error:  # a malformed multipart body
                    spool.close()
                    raise Refusal(400, "bad_multipart", f"Malformed multipart: {error}") from None
            spool.write(chunk)
            more = message.get("more_body", False)
        spool.seek(0)
        return _replay(spool, receive), shape.files if shape is not None else 0

    @staticmethod
    async def _refuse(send: Send, refusal: Refusal) -> None:
        telemetry.rejected_inputs.labels(refusal.reason).inc()
        body = json.dumps({"error": refusal.message, "reason": refusal.reason}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
        headers += [(k.lower().encode(), v.encode()) for k, v in refusal.headers.items()]
        await send({"type": "http.response.start", "status": refusal.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def _replay(spool: Any, receive: Receive, chunk_size: int = 1 << 16) -> Receive:
    """A `receive` that hands the spooled body on in chunks, then waits for the client."""
    done = False

    async def replay() -> Message:
        nonlocal done
        if done:
            return await receive()  # only http.disconnect can come now
        chunk = spool.read(chunk_size)
        if len(chunk) < chunk_size:
            done = True
            spool.close()
        return {"type": "http.request", "body": chunk, "more_body": not done}

    return replay
