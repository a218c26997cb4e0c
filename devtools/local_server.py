"""Run the bundle locally from a checkout: export models, start `bentoml serve` on a free
port and stop it (and its workers) afterwards, drive it with Locust.

Tests and benchmarks share these, so a benchmark measures the server the tests check.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from detector.commands.readiness import wait_until_ready

REPO = Path(__file__).resolve().parents[1]  # the checkout holding service.py
_SERVERS: dict[str, subprocess.Popen] = {}  # base URL -> its `bentoml serve` process


# Debian's headless Chromium, for the web page's tests.
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def wait_for(page: Any, expression: str, timeout: float = 30.0) -> None:
    """Poll a JavaScript expression until it is true in a Playwright page. Playwright's own
    `wait_for_function` compiles its predicate with eval, which the page's
    Content-Security-Policy forbids; an evaluation from outside the page is allowed."""
    deadline = time.monotonic() + timeout
    while not page.evaluate(expression):
        if time.monotonic() > deadline:
            raise TimeoutError(f"the page never had {expression}")
        time.sleep(0.1)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def service_env(bentoml_home: Path, repo: Path = REPO, **extra: str) -> dict[str, str]:
    env = {
        **os.environ,
        "BENTOML_HOME": str(bentoml_home),
        "BENTOML_DO_NOT_TRACK": "True",
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(repo),
        "INSPECT_THREADS": "2",
    }
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    env.update(extra)
    return env


def locust_command(url: str, users: int, seconds: int, csv_prefix: Path, *extra: str) -> list[str]:
    """A headless Locust run of locustfile.py that writes CSV stats under `csv_prefix`."""
    return [
        sys.executable,
        "-m",
        "locust",
        "-f",
        "locustfile.py",
        "--headless",
        "--host",
        url,
        "-u",
        str(users),
        "-r",
        str(users),
        "-t",
        f"{seconds}s",
        "--csv",
        str(csv_prefix),
        "--only-summary",
        *extra,
    ]


def stored_model(bentoml_home: Path, tag: str) -> dict:
    """What `bentoml models get TAG -o json` shows for a model in `bentoml_home`."""
    import json

    shown = subprocess.run(
        [sys.executable, "-m", "bentoml", "models", "get", tag, "-o", "json"],
        env=service_env(bentoml_home),
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(shown.stdout)


@contextmanager
def page_with_key(url: str, key: str) -> Iterator[Any]:
    """A headless Chromium page at `url` with `key` typed into the page's key field."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as driver:
        browser = driver.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS
        )
        try:
            page = browser.new_page()
            page.goto(url)
            page.fill("#apikey", key)
            page.dispatch_event("#apikey", "change")
            yield page
        finally:
            browser.close()


@contextmanager
def checkout_of(commit: str, scratch: Path) -> Iterator[Path]:
    """An older commit of this repository as a `git worktree` (a benchmark's "before"),
    removed afterwards."""
    path = scratch / f"checkout-{commit}"
    command = ["git", "-C", str(REPO), "worktree", "add", "--detach", str(path), commit]
    subprocess.run(command, check=True, capture_output=True)
    try:
        yield path
    finally:
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(path)])


def export_models(
    model_dir: Path, bentoml_home: Path, *args: str, repo: Path = REPO
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "detector", "export", str(model_dir), *args],
        cwd=repo,
        env=service_env(bentoml_home, repo),
        capture_output=True,
        text=True,
        timeout=300,
    )


@contextmanager
def bentoml_serve(
    bentoml_home: Path, log_path: Path, timeout: float = 120, repo: Path = REPO, **extra_env: str
) -> Iterator[str]:
    """Yield the base URL once /readyz answers 200; fail with the server log if it never does.
    `repo` serves another checkout (a benchmark comparing with an older commit)."""
    port = free_port()
    log = open(log_path, "w")  # noqa: SIM115 - closed in finally
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bentoml",
            "serve",
            "service:InspectionAPI",
            "--port",
            str(port),
            "--host",
            "127.0.0.1",
        ],
        cwd=repo,
        env=service_env(bentoml_home, repo, **extra_env),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    _SERVERS[url] = process
    try:
        try:
            wait_until_ready(url, process, timeout)
        except RuntimeError as error:
            raise RuntimeError(f"{error}\n" + log_path.read_text()[-4000:]) from None
        yield url
    finally:
        _SERVERS.pop(url, None)
        graceful = stop(process)
        log.close()
    if not graceful:  # every served test checks what Kubernetes will do: SIGTERM, then wait
        raise RuntimeError(
            f"bentoml serve did not stop within {STOP_GRACE_S:.0f} s of SIGTERM:\n"
            + log_path.read_text()[-3000:]
        )


def role_of(command: str) -> str:
    """'runner', 'api' or 'arbiter', from a server process's command line."""
    if "--service-name inspection_runner" in command:
        return "runner"
    return "api" if "--service-name inspection_api" in command else "arbiter"


def kill_server(url: str) -> None:
    """Kill the server at `url` and every process it started with SIGKILL, as a machine
    that fails or a pod evicted past its grace period does: no shutdown hook runs."""
    import psutil

    root = psutil.Process(_SERVERS[url].pid)
    for process in [*root.children(recursive=True), root]:
        with contextlib.suppress(psutil.Error):
            process.kill()
    _SERVERS[url].wait(timeout=10)


def service_rss_mib(url: str) -> dict[str, float]:
    """RSS in MiB of each process of the server at `url`, keyed 'role pid'."""
    import psutil

    root = psutil.Process(_SERVERS[url].pid)
    sizes = {}
    for process in [root, *root.children(recursive=True)]:
        try:
            role = role_of(" ".join(process.cmdline()))
            sizes[f"{role} {process.pid}"] = round(process.memory_info().rss / 2**20, 1)
        except psutil.Error:  # a worker that just exited
            continue
    return sizes


def service_cpu_seconds(url: str) -> dict[str, float]:
    """CPU seconds (user + system) each role of the server at `url` has used so far."""
    import psutil

    root = psutil.Process(_SERVERS[url].pid)
    seconds: dict[str, float] = {}
    for process in [root, *root.children(recursive=True)]:
        try:
            role = role_of(" ".join(process.cmdline()))
            times = process.cpu_times()
            seconds[role] = seconds.get(role, 0.0) + times.user + times.system
        except psutil.Error:
            continue
    return seconds


# How long a server may take to stop after SIGTERM: Kubernetes' default grace period is
# 30 s, and a pod still running then is killed mid-write.
STOP_GRACE_S = 20.0


def stop(process: subprocess.Popen) -> bool:
    """Stop a server and every process it started; True when SIGTERM was enough. BentoML's
    workers may run in process groups of their own, out of reach of the arbiter's group:
    each one seen is ended too."""
    import psutil

    try:
        descendants = psutil.Process(process.pid).children(recursive=True)
    except psutil.Error:
        descendants = []
    graceful = True
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            graceful = False
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
    _, alive = psutil.wait_procs(descendants, timeout=10)
    for leftover in alive:
        graceful = False
        leftover.kill()
    return graceful


def serve_until_exit(
    bentoml_home: Path, timeout: float, host: str = "127.0.0.1", **extra_env: str
) -> tuple[int | None, str]:
    """Start a server expected to refuse to start; return its exit code and output."""
    port = free_port()
    command = ["bentoml", "serve", "service:InspectionAPI", "--port", str(port), "--host", host]
    process = subprocess.Popen(
        [sys.executable, "-m", *command],
        cwd=REPO,
        env=service_env(bentoml_home, **extra_env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=timeout)
        return process.returncode, output
    except subprocess.TimeoutExpired:
        stop(process)
        output, _ = process.communicate()
        return None, output
