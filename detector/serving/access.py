"""Who may do what: API keys with roles, the posture the service starts in, and the host
names it answers to.

Three roles, each allowed what the ones before it are:

    line      score images (/inspect, /heatmap, /inspect_batch) and read what scoring
              states (/model_info, /drift, the product list): a camera or a line PC
    reviewer  + read records and their kept images, review them, read a bank's history
              and the threshold suggestion: a quality engineer at the review desk
    admin     + change a bank: add images, roll back, move the threshold; make a product

Secure by default: nothing that changes a bank, a threshold or a record, and nothing that
reveals records or their images, is ever anonymous, whatever is configured. Only the line
role's routes can be opened to anonymous clients, and only two ways: no key configured and
the client on loopback (a developer's machine; the server refuses to start on another
address), or `INSPECT_ANONYMOUS_SCORING=true`, said explicitly.

Keys are compared in constant time and never logged, recorded or shown by `repr`: a
record names the key that sent it by its name.
"""

from __future__ import annotations

import hmac
import ipaddress
import math
import os
import re
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from detector.environment import env_bool
from detector.errors import UserError

ROLES = ("line", "reviewer", "admin")
# A load test's key: the line's routes, scored as the line's are, but never recorded, never
# in a drift window or flag rate, and counted apart in the metrics (inspection_load_test_
# answers_total), so a Locust run leaves the line's review queue and alerts alone.
LOAD_TEST = "loadtest"
KEY_ROLES = (*ROLES, LOAD_TEST)
MIN_KEY_LENGTH = 16
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
KEY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# The names INSPECT_API_KEY and INSPECT_ADMIN_KEY are recorded under.
SINGLE_KEY_NAMES = {"INSPECT_API_KEY": "default", "INSPECT_ADMIN_KEY": "admin"}


def allows(role: str, needed: str) -> bool:
    """Whether a key of `role` may do what `needed` may."""
    if role == LOAD_TEST:
        return needed == "line"
    return ROLES.index(role) >= ROLES.index(needed)


@dataclass(frozen=True)
class ApiKey:
    name: str  # what records and logs say; never the secret
    role: str
    secret: str = field(repr=False)


def _secret(setting: str, value: str) -> str:
    """A key as given, less the whitespace a shell or a secret file leaves around it."""
    secret = value.strip()
    if len(secret) < MIN_KEY_LENGTH:
        raise UserError(
            f"{setting} holds a key of {len(secret)} characters; keys need at least "
            f"{MIN_KEY_LENGTH} (make one with: python -c 'import secrets; "
            "print(secrets.token_urlsafe(24))')."
        )
    return secret


def parse_keys(api_key: str | None, admin_key: str | None, named: str | None) -> tuple[ApiKey, ...]:
    """Every key the service accepts.

    INSPECT_API_KEY is a `line` key named "default", INSPECT_ADMIN_KEY an `admin` key named
    "admin", and INSPECT_API_KEYS holds named keys with their roles:
    `line3=line:KEY,ann=reviewer:KEY,ops=admin:KEY,locust=loadtest:KEY`. A name given
    twice, a secret shared by two names, a missing role or a short key stops the start:
    each would silently give a key another key's power, or none.
    """
    keys: list[ApiKey] = []
    if api_key and api_key.strip():
        keys.append(ApiKey("default", "line", _secret("INSPECT_API_KEY", api_key)))
    if admin_key and admin_key.strip():
        keys.append(ApiKey("admin", "admin", _secret("INSPECT_ADMIN_KEY", admin_key)))
    for item in (part.strip() for part in (named or "").split(",")):
        if not item:
            continue
        name, separator, rest = item.partition("=")
        role, colon, secret = rest.partition(":")
        name, role = name.strip(), role.strip()
        if not separator or not colon or role not in KEY_ROLES or not KEY_NAME.match(name):
            shown = name if KEY_NAME.match(name) else "an entry"
            raise UserError(
                f"INSPECT_API_KEYS: {shown} is not name=role:key with a role of "
                f"{', '.join(KEY_ROLES)} (e.g. line3=line:KEY,ann=reviewer:KEY)."
            )
        keys.append(ApiKey(name, role, _secret(f"INSPECT_API_KEYS ({name})", secret)))
    names = [key.name for key in keys]
    for name in sorted({name for name in names if names.count(name) > 1}):
        taken = [setting for setting, used in SINGLE_KEY_NAMES.items() if used == name]
        where = f" (the name {taken[0]} is recorded under)" if taken else ""
        raise UserError(f"Two keys are named {name!r}{where}: give each key its own name.")
    secrets_seen: dict[str, str] = {}
    for key in keys:
        if key.secret in secrets_seen:
            raise UserError(
                f"Keys {secrets_seen[key.secret]!r} and {key.name!r} are the same secret: "
                "give each its own, so a record says which client sent it."
            )
        secrets_seen[key.secret] = key.name
    return tuple(keys)


def is_loopback(host: str | None) -> bool:
    if not host:
        return False
    host = host.strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def host_name(header: str) -> str:
    """The host name of a Host header or an Origin's authority, without port or brackets."""
    value = header.strip().lower()
    if value.startswith("["):  # [::1]:3000
        return value[1 : value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


@dataclass(frozen=True)
class Access:
    """The service's keys, what anonymous clients may do, and the host names it answers."""

    keys: tuple[ApiKey, ...] = ()
    anonymous_scoring: bool = False  # INSPECT_ANONYMOUS_SCORING: line routes for anyone
    allowed_hosts: tuple[str, ...] = LOOPBACK_HOSTS
    hosts_configured: bool = False  # INSPECT_ALLOWED_HOSTS was given

    def identify(self, given: str) -> ApiKey | None:
        """The key a request carries, or None. Every key is compared (in constant time), so
        the time taken says nothing about which one matched, or how much of one."""
        found = None
        for key in self.keys:
            if hmac.compare_digest(given.encode(), key.secret.encode()):
                found = key
        return found

    def answers(self, client_host: str | None) -> bool:
        """Whether this client gets any answer at all: with no key configured and scoring
        not opened, only this machine does (whatever address the server listens on)."""
        return bool(self.keys) or self.anonymous_scoring or is_loopback(client_host)

    def anonymous_allowed(self, client_host: str | None) -> bool:
        """Whether a request without a key may use the line role's routes."""
        return self.anonymous_scoring or (not self.keys and is_loopback(client_host))

    def host_allowed(self, header: str | None) -> bool:
        """The Host header names this service: guards against DNS rebinding, where a page
        on another site reaches a service on loopback or the plant network by a name the
        attacker controls. `.example.com` allows its subdomains, `*` any name."""
        if not header:
            return False
        name = host_name(header)
        for allowed in self.allowed_hosts:
            if allowed == "*" or name == allowed:
                return True
            if allowed.startswith(".") and (name.endswith(allowed) or name == allowed[1:]):
                return True
        return False

    def roles(self) -> dict[str, int]:
        return {role: sum(key.role == role for key in self.keys) for role in ROLES}

    def posture(self) -> str:
        """One line for the start-up log: who may do what (never a key)."""
        if self.keys:
            counts = ", ".join(f"{role} {n}" for role, n in self.roles().items())
            load_tests = sum(key.role == LOAD_TEST for key in self.keys)
            if load_tests:
                counts += f", {LOAD_TEST} {load_tests} (scored, never recorded)"
            who = f"keys required ({counts})"
            missing = [role for role, n in self.roles().items() if not n]
            if missing and not self.roles()["admin"]:
                who += f"; no key may do {'/'.join(missing)} work"
        else:
            who = "no key configured: records, reviews and bank changes are refused to everyone"
        anonymous = (
            "scoring open to anonymous clients (INSPECT_ANONYMOUS_SCORING)"
            if self.anonymous_scoring
            else "anonymous scoring from loopback only"
            if not self.keys
            else "no anonymous access"
        )
        hosts = "any" if "*" in self.allowed_hosts else ", ".join(self.allowed_hosts)
        return f"access: {who}; {anonymous}; host names answered: {hosts}"

    def check_start(self, bind_host: str | None) -> None:
        """Refuse a start that would leave the service open, or deaf, on the network."""
        if bind_host is None or is_loopback(bind_host):
            return
        if not self.keys and not self.anonymous_scoring:
            raise UserError(
                f"The service would listen on {bind_host} with no API key: set "
                "INSPECT_API_KEYS (name=role:key) or INSPECT_ADMIN_KEY, or serve on loopback "
                "(bentoml serve --host 127.0.0.1); INSPECT_ANONYMOUS_SCORING=true opens "
                "scoring, and only scoring, to anyone."
            )
        if not self.hosts_configured:
            raise UserError(
                f"The service would listen on {bind_host} but answers only requests for "
                f"{', '.join(LOOPBACK_HOSTS)}: set INSPECT_ALLOWED_HOSTS to the host names "
                "clients use (e.g. inspection.plant.local,10.0.4.7), or * for any."
            )


def access_from_env(environ: Mapping[str, str] = os.environ) -> Access:
    hosts = [
        name.strip().lower().strip("[]")
        for name in environ.get("INSPECT_ALLOWED_HOSTS", "").split(",")
        if name.strip()
    ]
    return Access(
        keys=parse_keys(
            environ.get("INSPECT_API_KEY"),
            environ.get("INSPECT_ADMIN_KEY"),
            environ.get("INSPECT_API_KEYS"),
        ),
        anonymous_scoring=env_bool("INSPECT_ANONYMOUS_SCORING", False, environ),
        allowed_hosts=tuple(hosts) or LOOPBACK_HOSTS,
        hosts_configured=bool(hosts),
    )


SERVING_COMMANDS = ("serve", "serve-http", "serve-grpc", "start-http-server", "start-api-server")


def serving_host(argv: Sequence[str], environ: Mapping[str, str] = os.environ) -> str | None:
    """The address a `bentoml serve` (or one of its aliases) binds, read in its own process
    as click reads it (the last --host wins); None anywhere else (`bentoml build`, a worker,
    a test importing the service)."""
    if not any(command in argv[1:3] for command in SERVING_COMMANDS):
        return None
    host = None
    for position, arg in enumerate(argv):
        if arg == "--host" and position + 1 < len(argv):
            host = argv[position + 1]
        elif arg.startswith("--host="):
            host = arg.split("=", 1)[1]
    if host is not None:
        return host
    if environ.get("BENTOML_HOST"):
        return environ["BENTOML_HOST"]
    from bentoml._internal.configuration.containers import BentoMLContainer

    return str(BentoMLContainer.http.host.get())


def client_key(address: str) -> str:
    """Whose wrong keys these are: the address, or an IPv6 client's /64 (one host can
    hold a whole /64)."""
    try:
        parsed = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(parsed, ipaddress.IPv6Address):
        if parsed.ipv4_mapped is not None:
            return str(parsed.ipv4_mapped)
        return str(ipaddress.ip_network(f"{parsed}/64", strict=False))
    return str(parsed)


class FailedKeys:
    """Wrong keys per client address: after `free` of them within `window_s`, the client
    waits 2, 4, 8 ... seconds (at most `max_wait_s`) before a key is checked again, so a
    guesser gets a handful of tries a minute instead of a thousand a second. A right key
    does not clear the count (a line key's holder could otherwise guess the admin key
    between its own requests); only `window_s` without a wrong key does. Bounded: the
    least recently seen clients are forgotten beyond `max_clients`."""

    def __init__(
        self,
        free: int = 10,
        window_s: float = 60.0,
        max_wait_s: float = 300.0,
        max_clients: int = 10_000,
    ) -> None:
        self.free, self.window_s, self.max_wait_s = free, window_s, max_wait_s
        self.max_clients = max_clients
        # client -> (wrong keys in a row, time of the last one, blocked until)
        self._clients: OrderedDict[str, tuple[int, float, float]] = OrderedDict()

    def wait_s(self, client: str, now: float | None = None) -> float:
        """Seconds before this client may try a key again (0: now)."""
        now = time.monotonic() if now is None else now
        entry = self._clients.get(client)
        return max(0.0, entry[2] - now) if entry else 0.0

    def failed(self, client: str, now: float | None = None) -> None:
        """One more wrong key; a client quiet for `window_s` starts again from zero."""
        now = time.monotonic() if now is None else now
        count, last, _ = self._clients.pop(client, (0, now, 0.0))
        count = 1 if now - last > self.window_s else count + 1
        over = count - self.free
        blocked = now + min(self.max_wait_s, math.pow(2, min(over, 30))) if over > 0 else 0.0
        self._clients[client] = (count, now, blocked)
        while len(self._clients) > self.max_clients:
            self._clients.popitem(last=False)
