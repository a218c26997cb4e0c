"""What a request must pass before BentoML reads its body: host, origin, key and role,
size, queue, upload shape.

BentoML parses a whole multipart body (into memory, then a temp file) before an API method
runs, so checks in the method come too late: an anonymous 300 MB upload raised the API's
RSS by 300 MB. This ASGI middleware runs first, in this order:

1. the Host header against `INSPECT_ALLOWED_HOSTS` (loopback names by default), for every
   request but the health probes and /metrics: a page on another site that rebinds its
   own name to this service's address gets nothing;
2. for every guarded route: a request a browser marks cross-site (`Sec-Fetch-Site`, or an
   `Origin` that is not this host) is refused, and a body must be of the route's declared
   type (JSON or multipart), so no HTML form or `text/plain` fetch can change anything;
3. the API key and its role (detector/serving/access.py): line for scoring, reviewer for
   records and review, admin for bank changes; wrong keys are counted per client and a
   client that keeps guessing waits longer and longer. The name of the key that matched
   (never the key) is left in the request's scope for its record;
4. the declared size (Content-Length) against the route's limit;
5. the queue: beyond `INSPECT_MAX_QUEUE` images in flight (an /inspect_batch request counts
   its images once its parts are read; a review heatmap is one), 503 with Retry-After;
6. the body, streamed into a spooled file (1 MiB in memory, the rest on disk) and counted as
   it arrives, so a chunked upload without a length is cut at the limit too; its multipart
   parts are read as they stream: an image field must be a file (a text field with a URL
   would make BentoML download it), and /inspect_batch may carry at most
   `INSPECT_MAX_BATCH_FILES` files.

Only then is the body replayed to BentoML. Answering early costs nothing: uvicorn discards
the rest of a body once the response is complete. Every answer, the gate's own included,
carries headers that keep browsers from sniffing types or framing the service.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import anyio

from detector.serving import telemetry
from detector.serving.access import LOAD_TEST, FailedKeys, allows, client_key
from detector.serving.answers import Refusal, send_error, with_security_headers
from detector.serving.multipart import MultipartShape, media_type
from detector.serving.route_rules import MOUNTED, MULTIPART, Rule, rule_for, rules
from detector.serving.settings import Settings

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
SPOOL_IN_MEMORY = 1 << 20
# Answered whatever the Host header says: orchestrators probe and scrape by address.
log = logging.getLogger("inspection")
PROBES = frozenset({"/livez", "/readyz", "/healthz", "/metrics"})
UPLOAD_GRACE_S = 5.0  # an upload's first seconds are not held to the minimum rate


CALLER_SCOPE_KEY = "inspection.caller"
LOAD_TEST_SCOPE_KEY = "inspection.load_test"  # a loadtest key's request (access.LOAD_TEST)
ROLE_SCOPE_KEY = "inspection.role"  # the role of the key a request came with (None: no key)


class RequestGate:
    """ASGI middleware for the API service (`InspectionAPI.add_asgi_middleware`)."""

    def __init__(self, app: Callable[..., Awaitable[None]], settings: Settings) -> None:
        self.app = app
        self.settings = settings
        self.access = settings.access
        self.rules = rules(settings)
        self.failed_keys = FailedKeys()
        self.in_flight = 0
        self.uploading = 0
        self.at_once: dict[Rule, int] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        send = with_security_headers(send)
        path = scope.get("path", "")
        rule = rule_for(self.rules, scope.get("method", "GET"), path)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        try:
            self._check_door(scope, headers)
        except Refusal as refusal:
            return await self._refuse(send, refusal)
        if rule is None:
            return await self._answered(scope, receive, send)
        if path in MOUNTED:  # a mounted app's root, without a redirect
            scope["path"] = path + "/"
            scope["raw_path"] = path.encode() + b"/"
        weight = int(rule.queued and scope.get("method") in ("POST", "GET"))
        try:
            self._check_origin(headers)
            self._check_key(scope, headers, rule)
            has_body = self._check_body(scope, headers, rule)
            self._admit(weight, rule)  # refused at once when the queue is full already
            if has_body and self.uploading >= self.settings.max_uploads:
                raise Refusal(
                    503,
                    "overloaded",
                    "Too many uploads at once; retry after the time in Retry-After.",
                    **{"Retry-After": str(self.settings.retry_after_s)},
                )
        except Refusal as refusal:
            return await self._refuse(send, refusal)
        # The queue slot is taken once the body is here: a client that uploads slowly
        # holds an upload slot (and must keep INSPECT_UPLOAD_MIN_KBPS), never a turn
        # at the runner that a whole upload is waiting for.
        self.uploading += has_body
        try:
            replay, images = await self._read_body(scope, receive, rule)
            if weight and images > 1:  # a batch waits for as many runner turns
                # A batch above the whole queue is admitted when the queue is empty.
                weight = min(images, self.settings.max_queue)
            self._admit(weight, rule)
        except Refusal as refusal:
            return await self._refuse(send, refusal)
        finally:
            self.uploading -= has_body
        self.in_flight += weight
        self.at_once[rule] = self.at_once.get(rule, 0) + 1
        try:
            await self._answered(scope, replay, send)
        finally:
            self.in_flight -= weight
            self.at_once[rule] -= 1

    def _check_door(self, scope: Scope, headers: dict[str, str]) -> None:
        """Every request, guarded route or not: a keyless service answers this machine
        only, and any service only the host names it is known by (probes excepted)."""
        client = (scope.get("client") or ("", 0))[0] or ""
        if not self.access.answers(client):
            raise Refusal(
                403,
                "keyless_local_only",
                "No API key is configured: this service answers this machine only.",
            )
        path = scope.get("path", "")
        if path not in PROBES and not self.access.host_allowed(headers.get("host")):
            raise Refusal(
                400,
                "host_not_allowed",
                "This service does not answer to that host name (INSPECT_ALLOWED_HOSTS).",
            )

    def _admit(self, images: int, rule: Rule) -> None:
        crowded = rule.max_at_once is not None and self.at_once.get(rule, 0) >= rule.max_at_once
        if crowded or (images and self.in_flight + images > self.settings.max_queue):
            raise Refusal(
                503,
                "overloaded",
                "The service is at capacity; retry after the time in Retry-After.",
                **{"Retry-After": str(self.settings.retry_after_s)},
            )

    @staticmethod
    def _check_origin(headers: dict[str, str]) -> None:
        """A browser says where a request comes from; nothing guarded is done for another
        site's page (a form or fetch there could otherwise use a key-less local service, or
        a key the browser holds)."""
        site = headers.get("sec-fetch-site", "")
        origin = headers.get("origin")
        host = headers.get("host", "")
        foreign = site in ("cross-site", "same-site")
        if origin is not None and not foreign:
            authority = origin.split("://", 1)[-1].rstrip("/").lower()
            foreign = origin == "null" or authority != host.lower()
        if foreign:
            raise Refusal(
                403,
                "cross_site",
                "Requests from another site's page are refused: call the API directly or "
                "from this service's own page.",
            )

    def _check_key(self, scope: Scope, headers: dict[str, str], rule: Rule) -> None:
        client = (scope.get("client") or ("", 0))[0] or ""
        given = headers.get("x-api-key") or ""
        if not given and headers.get("authorization", "").startswith("Bearer "):
            given = headers["authorization"].removeprefix("Bearer ")
        scope[CALLER_SCOPE_KEY] = scope[ROLE_SCOPE_KEY] = None
        scope[LOAD_TEST_SCOPE_KEY] = False
        if not given:
            if rule.role == "line" and self.access.anonymous_allowed(client):
                return
            raise Refusal(401, "unauthorised", self._needs(rule.role))
        wait = self.failed_keys.wait_s(client_key(client))
        if wait > 0:
            raise Refusal(
                429,
                "too_many_wrong_keys",
                "Too many wrong keys from this address; retry after the time in Retry-After.",
                **{"Retry-After": str(max(1, round(wait)))},
            )
        key = self.access.identify(given)
        if key is None:
            self.failed_keys.failed(client_key(client))
            raise Refusal(401, "unauthorised", "Wrong API key: send a valid one as X-API-Key.")
        if not allows(key.role, rule.role):
            raise Refusal(
                403,
                "forbidden",
                f"The key {key.name!r} has the {key.role} role; this needs {rule.role}.",
            )
        # Which key sent the request, by name, for its record (api.caller); never the key.
        scope[CALLER_SCOPE_KEY], scope[ROLE_SCOPE_KEY] = key.name, key.role
        scope[LOAD_TEST_SCOPE_KEY] = key.role == LOAD_TEST

    def _needs(self, role: str) -> str:
        if not self.access.keys:
            return (
                f"No API key is configured, and this needs a key with the {role} role: set "
                "INSPECT_API_KEYS (name=role:key) or INSPECT_ADMIN_KEY and restart."
            )
        return f"Missing API key: this needs a key with the {role} role, sent as X-API-Key."

    @staticmethod
    def _check_body(scope: Scope, headers: dict[str, str], rule: Rule) -> bool:
        declared = headers.get("content-length")
        if declared is not None and (not declared.isascii() or not declared.isdigit()):
            raise Refusal(400, "bad_length", "Content-Length must be a whole number.")
        if declared is not None and int(declared) > rule.max_body:
            raise Refusal(
                413, "too_large", f"The request is {declared} bytes; the limit is {rule.max_body}."
            )
        has_body = declared not in (None, "0") or "transfer-encoding" in headers
        if scope.get("method") in ("GET", "HEAD"):
            has_body = False
        if has_body:
            given = media_type(headers.get("content-type", ""))
            if rule.body == MULTIPART and given != MULTIPART:
                raise Refusal(
                    415, "not_multipart", "Send the image as a multipart/form-data file upload."
                )
            if given != rule.body:
                expected = rule.body or "no body"
                raise Refusal(
                    415,
                    "wrong_content_type",
                    f"This route takes {expected}, not {given or 'an untyped body'}.",
                )
        scope["gate.content_type"] = headers.get("content-type", "")
        return has_body

    async def _read_body(self, scope: Scope, receive: Receive, rule: Rule) -> tuple[Receive, int]:
        """Stream the body into a spooled file, counting and shape-checking it as it comes;
        returns a `receive` that replays it, and the number of image files it holds."""
        shape = None
        if rule.body == MULTIPART and scope.get("method") in ("POST", "PUT"):
            shape = MultipartShape(scope["gate.content_type"], rule)
        spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY)  # noqa: SIM115
        size, more = 0, True
        started = time.monotonic()
        min_rate = self.settings.upload_min_kbps * 1024
        try:
            while more:
                try:
                    with anyio.fail_after(self.settings.upload_idle_s):
                        message = await receive()
                except TimeoutError:
                    raise Refusal(408, "too_slow", "The upload stalled; send it again.") from None
                elapsed = time.monotonic() - started
                if elapsed > UPLOAD_GRACE_S and size < min_rate * elapsed:
                    raise Refusal(
                        408,
                        "too_slow",
                        f"The upload is slower than {self.settings.upload_min_kbps} KiB/s "
                        "(INSPECT_UPLOAD_MIN_KBPS); send it again.",
                    )
                if message["type"] == "http.disconnect":
                    raise Refusal(400, "disconnected", "The client went away mid-upload.")
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > rule.max_body:
                    raise Refusal(413, "too_large", f"The request exceeds {rule.max_body} bytes.")
                if shape is not None:
                    shape.feed(chunk)
                spool.write(chunk)
                more = message.get("more_body", False)
        except BaseException:
            spool.close()
            raise
        spool.seek(0)
        return _replay(spool, receive), shape.files if shape is not None else 0

    async def _answered(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The app, with an answer even when it fails before answering.

        BentoML's timeout middleware, outside this one, waits for the first byte of an
        answer, not for the app: an error raised before any answer (its own /readyz raises
        TimeoutError while the runner starts) left the client waiting and the request
        pending for the whole traffic timeout (300 s), and a worker told to stop waited for
        it (uvicorn finishes pending requests first). A probe that fails says "not ready";
        anything else is a 500 with the log line that says why.
        """
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception as error:
            if started:
                raise
            path = scope.get("path", "")
            if path in PROBES:
                log.info("%s failed: %s: %s", path, type(error).__name__, error)
                await send_error(
                    send, Refusal(503, "not_ready", f"Not ready: {type(error).__name__}.")
                )
                return
            log.exception("%s %s failed before answering", scope.get("method"), path)
            message = "The service failed on this request; its log says why."
            await send_error(send, Refusal(500, "internal_error", message))

    @staticmethod
    async def _refuse(send: Send, refusal: Refusal) -> None:
        telemetry.rejected_inputs.labels(refusal.reason).inc()
        await send_error(send, refusal)


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
