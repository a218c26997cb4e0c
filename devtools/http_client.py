"""One HTTP client for the tests' requests to local servers.

httpx's module functions (`httpx.get`, `httpx.post`, ...) build a client, and with it a TLS
context, for every call: about 50 ms of CPU each, for plain HTTP on loopback too, and the
suite makes thousands of them. This client is built once and behaves as those calls do: a
new connection for every request (no keep-alive: a pooled connection could meet a server
that just closed it, or one that was restarted), no cookies kept, the same 5 s default
timeout. httpx documents a client as safe to share between threads.
"""

from __future__ import annotations

from http.cookiejar import CookieJar, DefaultCookiePolicy

import httpx

http_client = httpx.Client(
    limits=httpx.Limits(max_keepalive_connections=0),
    cookies=CookieJar(policy=DefaultCookiePolicy(allowed_domains=[])),
)
