"""Who may do what, checked in-process on the real `RequestGate` in front of a stand-in app:
keys and roles, the start-up posture, host names, cross-site requests, body types, wrong-key
back-off and the headers every answer carries. The served checks are in test_hardening."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from detector.errors import UserError
from detector.serving.access import (
    Access,
    FailedKeys,
    access_from_env,
    parse_keys,
    serving_host,
)
from detector.serving.gate import CALLER_SCOPE_KEY, RequestGate
from detector.serving.route_rules import rule_for, rule_key, rules
from detector.serving.settings import Settings

LINE, REVIEWER, ADMIN = "line-key-0123456789", "reviewer-key-0123456", "admin-key-0123456789"
NAMED = f"cam3=line:{LINE},ann=reviewer:{REVIEWER}"


def settings_with(monkeypatch: pytest.MonkeyPatch, **env: str) -> Settings:
    for name in (
        "INSPECT_API_KEY",
        "INSPECT_ADMIN_KEY",
        "INSPECT_API_KEYS",
        "INSPECT_ANONYMOUS_SCORING",
        "INSPECT_ALLOWED_HOSTS",
    ):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("INSPECT_DEVICE", "cpu")
    return Settings.from_env()


async def echo_app(scope: dict, receive: Callable, send: Callable) -> None:
    """Stands for BentoML behind the gate: answers who the gate said the caller was."""
    body = b""
    more = True
    while more:
        message = await receive()
        body += message.get("body", b"")
        more = message.get("more_body", False)
    caller = str(scope.get(CALLER_SCOPE_KEY)).encode()
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": caller})


def call(
    settings: Settings,
    method: str,
    path: str,
    client: str = "127.0.0.1",
    host: str = "127.0.0.1:3000",
    gate: RequestGate | None = None,
    **options: Any,
) -> httpx.Response:
    gate = gate or RequestGate(echo_app, settings)

    async def run() -> httpx.Response:
        transport = httpx.ASGITransport(app=gate, client=(client, 50000))
        async with httpx.AsyncClient(transport=transport, base_url=f"http://{host}") as http:
            return await http.request(method, path, **options)

    return asyncio.run(run())


def inspect_upload(**options: Any) -> dict[str, Any]:
    return {"files": {"image": ("p.png", b"\x89PNG not really", "image/png")}, **options}


ROUTES = [  # (method, path, the role it needs, request options)
    ("POST", "/inspect", "line", inspect_upload()),
    ("POST", "/drift", "line", {"json": {}}),
    ("GET", "/products", "line", {}),
    ("GET", "/products/carpet/history", "reviewer", {}),
    ("GET", "/products/carpet/suggestion", "reviewer", {}),
    ("GET", "/records", "reviewer", {}),
    ("GET", "/records/summary", "reviewer", {}),
    ("GET", "/records/activity", "reviewer", {}),
    ("GET", "/records/18ecc5d3db7443b6be79653c21/explanation", "reviewer", {}),
    ("GET", "/records/18ecc5d3db7443b6be79653c21/image", "reviewer", {}),
    ("POST", "/records/18ecc5d3db7443b6be79653c21/review", "reviewer", {"json": {}}),
    ("POST", "/products/carpet/threshold", "admin", {"json": {"threshold": 1}}),
    ("POST", "/products/carpet/rollback", "admin", {"json": {"version": "v1"}}),
    ("POST", "/products/carpet/images", "admin", {"files": {"records": (None, "x")}}),
    ("POST", "/products/carpet/delete", "admin", {"json": {}}),  # unknown: strictest rule
    ("GET", "/products/carpet/history/../../records", "admin", {}),
]


def test_keys_are_named_with_roles_stripped_and_refused_when_ambiguous_or_short() -> None:
    keys = parse_keys(f" {LINE}\n", ADMIN, f"ann=reviewer:{REVIEWER} ,")
    assert [(k.name, k.role, k.secret) for k in keys] == [
        ("default", "line", LINE),
        ("admin", "admin", ADMIN),
        ("ann", "reviewer", REVIEWER),
    ]
    refusals = [
        ("short", None, None, "at least 16"),
        (None, None, f"cam3={LINE}", "name=role:key"),  # the old form: no role
        (None, None, f"cam3=operator:{LINE}", "name=role:key"),
        (None, ADMIN, f"admin=line:{LINE}", "named 'admin'"),
        (LINE, None, f"default=line:{REVIEWER}", "named 'default'"),
        (None, None, f"a=line:{LINE},a=admin:{ADMIN}", "named 'a'"),
        (LINE, ADMIN, f"b=line:{LINE}", "same secret"),
    ]
    for api_key, admin_key, named, message in refusals:
        with pytest.raises(UserError, match=message):
            parse_keys(api_key, admin_key, named)


def test_no_key_appears_in_the_settings_repr_or_the_posture_line(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = settings_with(monkeypatch, INSPECT_ADMIN_KEY=ADMIN, INSPECT_API_KEYS=NAMED)
    shown = repr(settings) + settings.access.posture()
    for secret in (LINE, REVIEWER, ADMIN):
        assert secret not in shown
    assert "line 1, reviewer 1, admin 1" in settings.access.posture()


def test_a_keyless_start_on_the_network_is_refused_unless_scoring_is_opened() -> None:
    keyless = Access()
    keyless.check_start("127.0.0.1")
    keyless.check_start("::1")
    keyless.check_start(None)  # not `bentoml serve` (a build, a worker)
    with pytest.raises(UserError, match="INSPECT_ADMIN_KEY"):
        keyless.check_start("0.0.0.0")
    Access(anonymous_scoring=True, hosts_configured=True).check_start("0.0.0.0")
    keyed = access_from_env({"INSPECT_ADMIN_KEY": ADMIN})
    with pytest.raises(UserError, match="INSPECT_ALLOWED_HOSTS"):
        keyed.check_start("0.0.0.0")
    access_from_env({"INSPECT_ADMIN_KEY": ADMIN, "INSPECT_ALLOWED_HOSTS": "*"}).check_start("::")


def test_the_bind_address_is_read_as_bentoml_serve_reads_it() -> None:
    serve = ["/venv/bin/bentoml", "serve", "service:InspectionAPI"]
    assert serving_host([*serve, "--host", "10.1.2.3"], {}) == "10.1.2.3"
    assert serving_host([*serve, "--host=::1"], {}) == "::1"
    assert serving_host(serve, {"BENTOML_HOST": "127.0.0.1"}) == "127.0.0.1"
    assert serving_host(serve, {}) == "0.0.0.0"  # BentoML's default
    assert serving_host(["/venv/bin/bentoml", "build"], {}) is None
    # As click reads it: the last --host wins; the command's aliases serve too.
    assert serving_host([*serve, "--host", "127.0.0.1", "--host", "0.0.0.0"], {}) == "0.0.0.0"
    assert serving_host(["/venv/bin/bentoml", "serve-http", "service:X"], {}) == "0.0.0.0"
    worker = ["-m", "_bentoml_impl.worker.service", "--fd", "3", "--host", "0.0.0.0"]
    assert serving_host(worker, {}) is None


@pytest.mark.parametrize(("method", "path", "role", "options"), ROUTES)
def test_each_route_takes_the_keys_of_its_role_and_no_other(
    monkeypatch: pytest.MonkeyPatch, method: str, path: str, role: str, options: dict
) -> None:
    settings = settings_with(monkeypatch, INSPECT_ADMIN_KEY=ADMIN, INSPECT_API_KEYS=NAMED)
    gate = RequestGate(echo_app, settings)
    for name, key, rank in (("cam3", LINE, 0), ("ann", REVIEWER, 1), ("admin", ADMIN, 2)):
        answer = call(settings, method, path, gate=gate, headers={"X-API-Key": key}, **options)
        if rank >= ("line", "reviewer", "admin").index(role):
            assert answer.status_code == 200 and answer.text == name, (path, name)
        else:
            assert answer.status_code == 403 and role in answer.json()["error"], (path, name)
    anonymous = call(settings, method, path, gate=gate, **options)
    assert anonymous.status_code == 401, path  # keys configured: nothing anonymous


@pytest.mark.parametrize(("method", "path", "role", "options"), ROUTES)
def test_without_keys_only_scoring_is_anonymous_and_only_from_loopback(
    monkeypatch: pytest.MonkeyPatch, method: str, path: str, role: str, options: dict
) -> None:
    settings = settings_with(monkeypatch)
    local = call(settings, method, path, **options)
    if role == "line":
        assert local.status_code == 200 and local.text == "None"
    else:
        assert local.status_code == 401 and "No API key is configured" in local.json()["error"]
    remote = call(settings, method, path, client="10.0.4.7", **options)
    assert remote.status_code == 403, "a client on another address gets nothing"
    assert remote.json()["reason"] == "keyless_local_only"
    opened = settings_with(monkeypatch, INSPECT_ANONYMOUS_SCORING="true")
    remote = call(opened, method, path, client="10.0.4.7", **options)
    assert remote.status_code == (200 if role == "line" else 401)
    for unguarded in ("/metrics", "/ui/", "/docs.json"):  # nothing at all, keyless
        assert call(settings, "GET", unguarded, client="10.0.4.7").status_code == 403


def test_an_admin_key_alone_is_needed_everywhere(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = settings_with(monkeypatch, INSPECT_ADMIN_KEY=ADMIN)
    for method, path, _, options in ROUTES:
        assert call(settings, method, path, **options).status_code == 401, path
        with_key = call(settings, method, path, headers={"X-API-Key": ADMIN}, **options)
        assert with_key.status_code == 200, path


def test_a_foreign_host_name_gets_nothing_but_the_probes(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = settings_with(monkeypatch, INSPECT_ADMIN_KEY=ADMIN)
    admin = {"X-API-Key": ADMIN}
    for host in ("evil.example:3000", "localhost.evil.example", "127.0.0.1.nip.io"):
        for path in ("/records", "/ui/", "/inspect_batch"):
            refused = call(settings, "GET", path, host=host, headers=admin)
            assert refused.status_code == 400 and refused.json()["reason"] == "host_not_allowed"
        assert call(settings, "GET", "/readyz", host=host).status_code == 200
        assert call(settings, "GET", "/metrics", host=host).status_code == 200
    for host in ("localhost:3000", "[::1]:3000", "127.0.0.1"):
        assert call(settings, "GET", "/records", host=host, headers=admin).status_code == 200
    named = settings_with(
        monkeypatch, INSPECT_ADMIN_KEY=ADMIN, INSPECT_ALLOWED_HOSTS="inspect.plant,.line.plant"
    )
    for host, status in (
        ("inspect.plant", 200),
        ("cam.line.plant:3000", 200),
        ("line.plant", 200),
        ("evilline.plant", 400),
        ("127.0.0.1:3000", 400),
    ):
        answer = call(named, "GET", "/records", host=host, headers=admin)
        assert answer.status_code == status, host


def test_cross_site_requests_and_smuggled_bodies_are_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = settings_with(monkeypatch)  # no key: what a cross-site page would aim at
    body = inspect_upload()
    for headers in (
        {"Sec-Fetch-Site": "cross-site"},
        {"Sec-Fetch-Site": "same-site"},
        {"Origin": "http://evil.example"},
        {"Origin": "null"},
        {"Origin": "http://127.0.0.1:8080"},  # another port is another origin
    ):
        answer = call(settings, "POST", "/inspect", headers=headers, **body)
        assert answer.status_code == 403 and answer.json()["reason"] == "cross_site", headers
    same = {"Origin": "http://127.0.0.1:3000", "Sec-Fetch-Site": "same-origin"}
    assert call(settings, "POST", "/inspect", headers=same, **body).status_code == 200
    keyed = settings_with(monkeypatch, INSPECT_ADMIN_KEY=ADMIN)
    admin = {"X-API-Key": ADMIN}
    text = call(
        keyed,
        "POST",
        "/products/carpet/threshold",
        content=b'{"threshold": 1e308}',
        headers={**admin, "Content-Type": "text/plain"},
    )
    assert text.status_code == 415 and text.json()["reason"] == "wrong_content_type"
    form = call(keyed, "POST", "/products/carpet/rollback", data={"version": "v1"}, headers=admin)
    assert form.status_code == 415
    untyped = call(keyed, "POST", "/drift", content=b"{}", headers=admin)
    assert untyped.status_code == 415
    empty = call(keyed, "POST", "/model_info", headers=admin)
    assert empty.status_code == 200  # no body, nothing to type
    not_multipart = call(keyed, "POST", "/inspect", json={"image": "http://x"}, headers=admin)
    assert not_multipart.status_code == 415 and not_multipart.json()["reason"] == "not_multipart"


def test_a_client_guessing_keys_is_slowed_down(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = settings_with(monkeypatch, INSPECT_ADMIN_KEY=ADMIN)
    gate = RequestGate(echo_app, settings)
    statuses = [
        call(
            settings, "GET", "/records", gate=gate, headers={"X-API-Key": f"guess-{n:012d}"}
        ).status_code
        for n in range(40)
    ]
    assert statuses[:10] == [401] * 10 and set(statuses[11:]) == {429}
    blocked = call(settings, "GET", "/records", gate=gate, headers={"X-API-Key": ADMIN})
    assert blocked.status_code == 429 and int(blocked.headers["retry-after"]) >= 1
    other = call(
        settings, "GET", "/records", gate=gate, client="10.9.9.9", headers={"X-API-Key": ADMIN}
    )
    assert other.status_code == 200  # another address is not held up


def test_waits_grow_and_the_table_stays_bounded() -> None:
    failed = FailedKeys(free=3, window_s=60, max_wait_s=30, max_clients=100)
    for _ in range(3):
        failed.failed("a", now=0)
    assert failed.wait_s("a", now=0) == 0
    waits = []
    for _ in range(8):
        failed.failed("a", now=1)
        waits.append(failed.wait_s("a", now=1))
    assert waits == [2, 4, 8, 16, 30, 30, 30, 30]
    failed.failed("a", now=200)  # quiet for longer than the window: counted from zero
    assert failed.wait_s("a", now=200) == 0
    for number in range(1000):
        failed.failed(f"client-{number}", now=2)
    assert len(failed._clients) == 100


def test_every_answer_carries_headers_against_sniffing_and_framing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = settings_with(monkeypatch, INSPECT_ADMIN_KEY=ADMIN)
    for answer in (
        call(settings, "GET", "/records", headers={"X-API-Key": ADMIN}),  # passed on
        call(settings, "GET", "/records"),  # refused by the gate
        call(settings, "GET", "/ui/"),  # not guarded
    ):
        assert answer.headers["x-content-type-options"] == "nosniff"
        assert answer.headers["x-frame-options"] == "DENY"


def test_the_page_is_served_with_a_policy_that_allows_only_its_own_script() -> None:
    import base64
    import hashlib
    import re

    from detector.serving.page import PAGE_FILE, page_response

    response = page_response()
    policy = response.headers["content-security-policy"]
    script = re.search(r"<script>(.*?)</script>", PAGE_FILE.read_text(), re.S).group(1)
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    assert f"script-src 'sha256-{digest}'" in policy
    assert "unsafe-inline" not in policy and "frame-ancestors 'none'" in policy


def test_paths_under_mounted_apps_never_escape_their_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    assert rule_key("/records") == rule_key("/records/") == "/records/"
    assert rule_key("/records/summary") == "/records/summary"
    assert rule_key("/records/activity") == "/records/activity"
    assert rule_key("/records/abc/explanation") == "/records/*/explanation"
    assert rule_key("/records/abc") == "/records/*"
    assert rule_key("/records/abc/review") == "/records/*/review"
    assert rule_key("/records/abc/review/extra") == "/records/**"
    assert rule_key("/products/x/threshold") == "/products/*/threshold"
    assert rule_key("/products//threshold") == "/products/**"
    assert rule_key("/products/x/y/z") == "/products/**"
    assert rule_key("/productsx") == "/productsx"  # not under /products: BentoML's 404
    assert rule_key("/products/x/jobs/ab12") == "/products/*/jobs/*"
    assert rule_key("/products/x/jobs/") == rule_key("/products/x/jobs/a/b") == "/products/**"
    table = rules(settings_with(monkeypatch))
    assert rule_for(table, "POST", "/products").role == "admin", "a new product is an admin's"
    assert rule_for(table, "GET", "/products").role == "line"
    assert rule_for(table, "DELETE", "/products/x/jobs/ab12").role == "admin"


def test_bad_parameters_are_a_sentence_and_a_4xx_never_a_500(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """In-process on the API's endpoints, with a records database and a server pinned to one
    product: each input that once gave a 500 and a traceback."""
    import dataclasses

    from detector.serving.api import InspectionEndpoints
    from detector.serving.mounted import json_object
    from detector.serving.records import Recorder

    base = settings_with(monkeypatch, INSPECT_ADMIN_KEY=ADMIN)
    settings = dataclasses.replace(base, products=["carpet"], records_dir=str(tmp_path))
    recorder = Recorder(settings)
    assert oct(tmp_path.stat().st_mode)[-3:] == "700", "records are for reviewers only"
    endpoints = InspectionEndpoints(runner=None, settings=settings, recorder=recorder)

    def status(work: Any) -> tuple[int, str]:
        answer = asyncio.run(InspectionEndpoints.respond(None, work))
        body = json.loads(answer.body)
        assert set(body) == {"error", "reason"} and body["error"].endswith(".")
        return answer.status_code, body["reason"]

    try:
        assert status(endpoints.records({"limit": "²"})) == (400, "bad_request")
        assert status(endpoints.records({"limit": "9" * 5000})) == (400, "bad_request")
        assert status(endpoints.suggestion("CARPET", {})) == (400, "bad_request")
        assert status(endpoints.suggestion("x" * 300, {})) == (400, "bad_request")
        # Pinned by INSPECT_PRODUCTS: another product is unknown on every route.
        assert status(endpoints.suggestion("line2", {})) == (404, "unknown_product")
        assert status(endpoints.history("line2", {})) == (404, "unknown_product")
        assert status(endpoints.set_threshold("line2", {"target": 0.1})) == (404, "unknown_product")
        assert status(endpoints.suggestion("carpet", {"target": "nan"})) == (400, "bad_request")
        assert status(endpoints.history("carpet", {"limit": "0"})) == (400, "bad_request")
        assert status(endpoints.set_threshold("carpet", {"threshold": 1, "x": 2})) == (
            400,
            "bad_request",
        )
        review = endpoints.review("0" * 26, {"label": "unsure", "reviewer": "mallory"}, "ann")
        assert status(review) == (400, "bad_request")
        assert status(endpoints.review("0" * 26, {"label": ["x"]}, "ann")) == (400, "bad_request")
        for body in (
            b'{"a":' * 5000 + b"1" + b"}" * 5000,  # nested deeper than Python parses
            b'{"label": "unsure", "note": "\\ud800"}',  # a lone surrogate: no database stores it
            b"[1, 2]",
        ):
            assert status(json_object(FakeRequest(body), "usage.")) == (400, "bad_json")
    finally:
        recorder.close()


class FakeRequest:
    def __init__(self, body: bytes) -> None:
        self._body = body

    async def body(self) -> bytes:
        return self._body


def test_an_unexpected_error_is_a_500_with_a_sentence_and_no_traceback() -> None:
    from detector.serving.api import InspectionEndpoints

    async def broken() -> None:
        raise KeyError("internal detail /srv/secret/path")

    answer = asyncio.run(InspectionEndpoints.respond(None, broken()))
    assert answer.status_code == 500
    assert b"secret" not in answer.body and json.loads(answer.body)["reason"] == "internal_error"


def chunked(*chunks: bytes, pause_s: float = 0.0) -> Any:
    async def body() -> Any:
        for chunk in chunks:
            yield chunk
            if pause_s:
                await asyncio.sleep(pause_s)

    return body()


def multipart(*parts: tuple[str, bytes | None], boundary: str = "XyZ") -> bytes:
    """(name, data) parts: data None makes a text part, bytes a file part."""
    body = b""
    for name, data in parts:
        if data is None:
            head = f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'
            body += head.encode() + b"x\r\n"
        else:
            body += (
                (
                    f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; '
                    f'filename="p.png"\r\nContent-Type: image/png\r\n\r\n'
                ).encode()
                + data
                + b"\r\n"
            )
    return body + f"--{boundary}--\r\n".encode()


def test_the_gate_reads_every_multipart_part_as_bentoml_will(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = settings_with(monkeypatch, INSPECT_ADMIN_KEY=ADMIN)
    admin = {"X-API-Key": ADMIN, "Content-Type": "multipart/form-data; boundary=XyZ"}

    def post(path: str, body: Any, headers: dict = admin) -> httpx.Response:
        return call(settings, "POST", path, content=body, headers=headers)

    # A URL in the image field, named in another charset: refused, never fetched.
    cp037 = {**admin, "Content-Type": "multipart/form-data; boundary=XyZ; charset=cp037"}
    url_part = (
        b'--XyZ\r\nContent-Disposition: form-data; name="'
        + "image".encode("cp037")
        + b'"\r\n\r\nhttp://10.0.0.1/a.png\r\n--XyZ--\r\n'
    )
    refused = post("/inspect", url_part, cp037)
    assert refused.status_code == 415 and refused.json()["reason"] == "bad_charset"
    # The same, its header name split across two chunks of the stream.
    text = multipart(("image", None))
    head, tail = text.split(b"Dis", 1)
    split = post("/inspect", chunked(head + b"Dis", tail))
    assert split.status_code == 400 and split.json()["reason"] == "not_a_file"
    many = multipart(*[("images", b"png") for _ in range(40)])
    pieces = [many[i : i + 7] for i in range(0, len(many), 7)]  # every boundary split
    assert post("/inspect_batch", chunked(*pieces)).json()["reason"] == "too_many_files"
    for fields, reason in (
        ((("image", b"png"), ("zzz", b"png")), "unknown_field"),
        ((("image", b"png"), ("product", b"png")), "not_text"),
        ((("image", b"png"), ("product", None), ("drift_profile", None)), None),
    ):
        answer = post("/inspect", multipart(*fields))
        if reason is None:
            assert answer.status_code == 200
        else:
            assert answer.status_code == 400 and answer.json()["reason"] == reason, fields


def test_slow_uploads_are_cut_and_never_hold_a_queue_slot(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import detector.serving.gate as gate_module

    monkeypatch.setattr(gate_module, "UPLOAD_GRACE_S", 0.3)
    settings = settings_with(
        monkeypatch,
        INSPECT_ADMIN_KEY=ADMIN,
        INSPECT_MAX_QUEUE="1",
        INSPECT_UPLOAD_IDLE_S="1",
        INSPECT_UPLOAD_MIN_KBPS="64",
    )
    gate = RequestGate(echo_app, settings)
    headers = {"X-API-Key": ADMIN, "Content-Type": "multipart/form-data; boundary=XyZ"}
    body = multipart(("image", b"png"))

    async def run() -> tuple[httpx.Response, httpx.Response, httpx.Response]:
        transport = httpx.ASGITransport(app=gate, client=("127.0.0.1", 50000))
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as http:
            trickle = [body[i : i + 4] for i in range(0, len(body), 4)]
            slow = asyncio.create_task(
                http.post("/inspect", content=chunked(*trickle, pause_s=0.2), headers=headers)
            )
            await asyncio.sleep(0.1)
            fast = await http.post("/inspect", content=body, headers=headers)  # queue of 1
            stalled = await http.post(
                "/inspect", content=chunked(body[:10], body[10:], pause_s=1.5), headers=headers
            )
            return await slow, fast, stalled

    slow, fast, stalled = asyncio.run(run())
    assert fast.status_code == 200, "a slow upload holds no queue slot"
    assert slow.status_code == 408 and "KiB/s" in slow.json()["error"]
    assert stalled.status_code == 408 and stalled.json()["reason"] == "too_slow"


def test_http_metrics_are_labelled_by_route_not_by_path() -> None:
    from detector.serving.telemetry import route_template

    record = "18ecc5d3db7443b6be79653c21"
    assert route_template(f"/records/{record}") == "/records/{id}"
    assert route_template(f"/records/{record}/image") == "/records/{id}/image"
    assert route_template("/products/line-7/history") == "/products/{name}/history"
    assert route_template("/inspect") == "/inspect"
    assert route_template("/score") == "/score"  # the runner's
    for scan in ("/wp-admin", "/records/x/y/z", "/products/a/delete", "/.env", "/inspect/x"):
        assert route_template(scan) == "other", scan


def test_a_load_test_key_does_the_lines_scoring_and_nothing_else() -> None:
    from detector.serving.access import Access, allows, parse_keys

    keys = parse_keys(None, None, "locust=loadtest:" + "k" * 20 + ",line3=line:" + "l" * 20)
    assert [(key.name, key.role) for key in keys] == [("locust", "loadtest"), ("line3", "line")]
    assert allows("loadtest", "line")
    assert not allows("loadtest", "reviewer") and not allows("loadtest", "admin")
    posture = Access(keys=keys).posture()
    assert "loadtest 1 (scored, never recorded)" in posture and "k" * 20 not in posture


def test_an_app_that_fails_before_answering_still_answers_at_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """BentoML's timeout middleware, in front of the gate, waits for an answer's first byte:
    an error raised before it (BentoML's /readyz raises TimeoutError while the runner
    starts) kept the request pending for 300 s, and a stopping worker waited for it."""
    settings = settings_with(monkeypatch, INSPECT_ADMIN_KEY=ADMIN)

    async def failing(scope: dict, receive: Callable, send: Callable) -> None:
        if scope["path"] == "/late":
            await send({"type": "http.response.start", "status": 200, "headers": []})
        raise TimeoutError("the runner is starting")

    gate = RequestGate(failing, settings)
    probe = call(settings, "GET", "/readyz", gate=gate)
    assert probe.status_code == 503 and probe.json()["reason"] == "not_ready"
    with caplog.at_level("ERROR", logger="inspection"):
        routed = call(settings, "POST", "/drift", gate=gate, json={}, headers={"X-API-Key": ADMIN})
    assert routed.status_code == 500 and routed.json()["reason"] == "internal_error"
    assert "TimeoutError" in caplog.text, "the log says why"
    with pytest.raises(TimeoutError):  # an answer under way is the server's to end
        call(settings, "GET", "/late", gate=gate)


def test_every_mounted_route_has_its_own_gate_rule_and_metrics_label(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The /products and /records routes are declared once, in their apps; the gate's
    rules and the metrics' route labels take the same action names, so a route added to
    an app without a rule would fall to the strictest one (and be counted as 'other')."""
    from detector.serving import telemetry
    from detector.serving.product_routes import products_app
    from detector.serving.record_routes import records_app

    known = rules(settings_with(monkeypatch))
    for prefix, app in (("/products", products_app), ("/records", records_app)):
        for route in app.routes:
            path = prefix + route.path.replace("{name}", "carpet").replace("{id}", "18ecc5d3db")
            path = path.replace("{job}", "5f2a9c01b7d4")
            assert rule_key(path) in known and not rule_key(path).endswith("**"), path
            assert telemetry.route_template(path) != "other", path
