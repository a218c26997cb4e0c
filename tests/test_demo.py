"""The demo that serves: `python -m detector demo --serve` prints its page and a Locust line
that works as printed (a module of its own: it runs beside tests/test_workflow.py's Bento
job, the suite's two longest tests, on the other worker)."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

from devtools.http_client import http_client
from devtools.local_server import REPO, free_port, service_env, stop, stored_model


def test_the_demo_serves_a_model_marked_demo_and_prints_its_page(tmp_path: Path) -> None:
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "detector",
            "demo",
            "--out",
            str(tmp_path / "demo"),
            "--serve",
            "--port",
            str(port),
            "data.generate.n_train=10",
            "data.generate.n_test_good=3",
            "data.generate.n_per_defect=1",
        ],
        cwd=REPO,
        env=service_env(tmp_path / "home"),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    try:
        deadline, page, load_test = time.monotonic() + 300, None, None
        for line in process.stdout:
            if "Serving the DEMO model" in line and " open " in line:
                page = line.split(" open ", 1)[1].split()[0]
            if "INSPECT_LOAD_TEST_KEY=" in line:
                load_test = line.strip()
                break
            assert time.monotonic() < deadline
        assert page is not None, "the demo printed no page address"
        assert load_test is not None, "the demo printed no load-test line"
        # The server's access log follows on the same pipe: read it away, or once the pipe's
        # buffer is full every write, and so every request, blocks.
        threading.Thread(target=process.stdout.read, daemon=True).start()
        # On loopback only, with a key made for this run riding after '#'.
        base, _, key = page.partition("/ui/#key=")
        assert base == f"http://127.0.0.1:{port}" and len(key) >= 16
        assert http_client.get(f"{base}/ui/", timeout=30).status_code == 200
        headers = {"X-API-Key": key}
        info = http_client.post(f"{base}/model_info", json={}, headers=headers, timeout=30).json()
        assert info["demo"] is True and info["random_weights"] is True
        (listed,) = http_client.get(f"{base}/products", headers=headers, timeout=30).json()
        assert listed["demo"] is True and listed["random_weights"] is True  # before any image
        assert http_client.get(f"{base}/records", headers=headers, timeout=30).status_code == 200
        assert http_client.get(f"{base}/records", timeout=30).status_code == 401
        listening = {c.laddr.ip for c in psutil.net_connections("tcp") if c.laddr.port == port}
        assert listening == {"127.0.0.1"}
        # The printed Locust line, run as printed (shortened): no failure, no record.
        load_key = load_test.split("INSPECT_LOAD_TEST_KEY=", 1)[1].split(";")[0]
        command = shlex.split(load_test.split("; ", 1)[1].replace("-t 30s", "-t 5s"))
        # One scored image first, with the same key: a fresh server's first answer pays
        # one-time costs. Requests in flight when the 5 s end are let finish and counted
        # (--stop-timeout): on a slow or busy host a 5 s run could end with none counted.
        part = next((tmp_path / "demo").rglob("*.png"))
        warm = http_client.post(
            f"{base}/inspect",
            files={"image": (part.name, part.read_bytes(), "image/png")},
            headers={"X-API-Key": load_key},
            timeout=120,
        )
        assert warm.status_code == 200, warm.text
        assert command[:5] == ["locust", "-f", "locustfile.py", "--host", base], command
        csv_prefix = tmp_path / "locust"
        ran = subprocess.run(
            [sys.executable, "-m", *command, "--stop-timeout", "60", "--csv", str(csv_prefix)]
            + ["--only-summary"],
            cwd=REPO,
            env={**service_env(tmp_path / "home"), "INSPECT_LOAD_TEST_KEY": load_key},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert ran.returncode == 0, ran.stderr[-2000:]
        stats = (csv_prefix.parent / "locust_stats.csv").read_text().splitlines()
        aggregated = next(row for row in stats if ",Aggregated," in row).split(",")
        assert int(aggregated[2]) > 0 and int(aggregated[3]) == 0, aggregated  # requests, fails
        time.sleep(2)  # the record writer is asynchronous: anything written would be in
        listing = http_client.get(f"{base}/records", headers=headers, timeout=60).json()
        assert listing["records"] == [], "a load test left records"
    finally:
        os.killpg(process.pid, signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            stop(process)
    assert stored_model(tmp_path / "home", "bank-carpet:latest")["labels"]["demo"] == "true"
