"""A short real Locust run, and a real Prometheus server scraping the service."""

from __future__ import annotations

import csv
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from devtools.http_client import http_client
from devtools.local_server import (
    REPO,
    bentoml_serve,
    free_port,
    locust_command,
    service_env,
    stop,
)

PROMETHEUS = shutil.which("prometheus")
LINE = {"X-API-Key": "line-key-for-metrics-tests"}
DESK = {"X-API-Key": "desk-key-for-metrics-tests"}
LOAD_TEST_KEY = "locust-key-for-load-tests"


@pytest.fixture(scope="module")
def server(store: Path, tmp_path_factory: pytest.TempPathFactory):
    home = store
    keys = f"line=line:{LINE['X-API-Key']},desk=reviewer:{DESK['X-API-Key']}"
    keys += f",locust=loadtest:{LOAD_TEST_KEY}"
    log = tmp_path_factory.mktemp("logs") / "serve.log"
    with bentoml_serve(home, log, INSPECT_API_KEYS=keys) as url:
        yield url


def test_the_readmes_locust_run_has_no_failures_and_leaves_the_line_alone(
    server: str, tmp_path: Path
) -> None:
    """The README's command with a loadtest key: no failures, and no record, no drift
    window image and no verdict of the line's from it; its answers are counted apart."""

    def line_state() -> tuple[int, int, str]:
        records = http_client.get(f"{server}/records", params={"limit": 500}, headers=DESK).json()
        drift = http_client.post(f"{server}/drift", json={}, headers=LINE, timeout=60).json()
        metrics = http_client.get(f"{server}/metrics", timeout=30).text
        verdicts = [line for line in metrics.splitlines() if line.startswith("inspection_verd")]
        return len(records["records"]), drift["images"], "\n".join(sorted(verdicts))

    before = line_state()
    prefix = tmp_path / "locust"
    result = subprocess.run(
        locust_command(server, 4, 6, prefix, "--image-size", "96", "--image-count", "4"),
        cwd=REPO,
        env={**service_env(tmp_path), "INSPECT_LOAD_TEST_KEY": LOAD_TEST_KEY},
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    with open(f"{prefix}_stats.csv") as handle:
        rows = {row["Name"]: row for row in csv.DictReader(handle)}
    assert int(rows["Aggregated"]["Failure Count"]) == 0
    assert int(rows["/inspect"]["Request Count"]) > 5
    assert int(rows["Aggregated"]["Request Count"]) > int(rows["/inspect"]["Request Count"])
    time.sleep(2)  # the record writer is asynchronous: anything written would be in by now
    assert line_state() == before
    metrics = http_client.get(f"{server}/metrics", timeout=30).text
    counted = [line for line in metrics.splitlines() if line.startswith("inspection_load_test")]
    assert any(float(line.split()[-1]) > 5 for line in counted if "_total" in line), counted
    # The key does the line's scoring only.
    assert (
        http_client.get(f"{server}/records", headers={"X-API-Key": LOAD_TEST_KEY}).status_code
        == 403
    )


def test_locust_counts_wrong_answers_as_failures() -> None:
    # Locust monkey-patches the process with gevent on import, so check in a child process.
    code = """
from locustfile import check_result
good = {"score": 2.0, "threshold": 1.0, "normalized_score": 2.0, "is_anomalous": True,
        "image_width": 8, "image_height": 6}
assert check_result(good) is None
assert "verdict" in check_result({**good, "is_anomalous": False})
assert "normalized" in check_result({**good, "normalized_score": 1.0})
assert "missing" in check_result({"error": "x"})
print("checked")
"""
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env=service_env(REPO),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0 and "checked" in result.stdout, result.stderr[-2000:]


@pytest.mark.skipif(PROMETHEUS is None, reason="Debian's prometheus package is not installed")
def test_real_prometheus_scrapes_request_counter_and_score_histogram(
    server: str, tmp_path: Path
) -> None:
    for _ in range(3):
        image = next((REPO / "tests").glob("*.py"))  # any bytes: counted as a rejected input
        image_file = {"image": ("x", image.read_bytes())}
        http_client.post(f"{server}/inspect", files=image_file, headers=LINE, timeout=30)
    png = _small_png()
    for _ in range(3):
        assert http_client.post(
            f"{server}/inspect", files={"image": ("x.png", png)}, headers=LINE, timeout=60
        ).is_success
    target = server.removeprefix("http://")
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s}\n"
        f"scrape_configs:\n  - job_name: inspection\n    static_configs:\n"
        f"      - targets: ['{target}']\n"
    )
    port = free_port()
    process = subprocess.Popen(
        [
            PROMETHEUS,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    api = f"http://127.0.0.1:{port}/api/v1/query"
    try:
        found: dict[str, list] = {}
        deadline = time.monotonic() + 60
        wanted = {
            "requests": 'bentoml_service_request_total{job="inspection"}',
            "scores": 'inspection_normalized_score_bucket{job="inspection"}',
            "rejected": 'inspection_rejected_inputs_total{job="inspection"}',
            "drift_window": 'inspection_drift_window_images{job="inspection"}',
        }
        while time.monotonic() < deadline and len(found) < len(wanted):
            for name, query in wanted.items():
                try:
                    data = http_client.get(api, params={"query": query}, timeout=5).json()
                except (httpx.HTTPError, ValueError):  # still starting: not yet JSON
                    continue
                if data.get("status") == "success" and data["data"]["result"]:
                    found[name] = data["data"]["result"]
            time.sleep(1)
    finally:
        stop(process)
    assert set(found) == set(wanted), f"Prometheus found only {sorted(found)}"
    assert any(float(series["value"][1]) >= 3 for series in found["requests"])
    assert any(float(series["value"][1]) >= 3 for series in found["rejected"])
    assert any(float(series["value"][1]) >= 3 for series in found["drift_window"])


@pytest.mark.skipif(shutil.which("promtool") is None, reason="Debian's prometheus is not installed")
def test_deployed_prometheus_config_and_alert_rules_are_valid() -> None:
    """promtool parses deploy/prometheus.yml and every rule in deploy/alerts.yml."""
    result = subprocess.run(
        ["promtool", "check", "config", "prometheus.yml"],
        cwd=REPO / "deploy",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    rules = (REPO / "deploy" / "alerts.yml").read_text()
    for alert in re.findall(r"alert: (\w+)", rules):  # each alert has a promtool test
        assert f"alertname: {alert}" in (REPO / "deploy" / "alerts_test.yml").read_text(), alert
    assert "SUCCESS: 8 rules found" in result.stdout
    # The alerts fire on the series they are meant for (deploy/alerts_test.yml): a product
    # whose reviewed alarms stay mostly false alarms, and records spooled or dropped.
    tested = subprocess.run(
        ["promtool", "test", "rules", "alerts_test.yml"],
        cwd=REPO / "deploy",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert tested.returncode == 0 and "SUCCESS" in tested.stdout, tested.stdout + tested.stderr


@pytest.mark.skipif(shutil.which("promtool") is None, reason="Debian's prometheus is not installed")
def test_the_kubernetes_prometheus_example_is_valid(tmp_path: Path) -> None:
    """deploy/k8s/prometheus.yml scrapes each pod by its annotations. Debian builds Prometheus
    without Kubernetes discovery, so promtool checks it with each discovery block swapped for
    a static target: the relabelling, the rules and the Alertmanager block are checked as
    written."""
    config = yaml.safe_load((REPO / "deploy" / "k8s" / "prometheus.yml").read_text())
    blocks = [*config["scrape_configs"], *config["alerting"]["alertmanagers"]]
    for block in blocks:
        assert [sd["role"] for sd in block.pop("kubernetes_sd_configs")] == ["pod"]
        block["static_configs"] = [{"targets": ["10.0.0.1:3000"]}]
    annotations = "__meta_kubernetes_pod_annotation_prometheus_io_scrape"
    assert annotations in str(config["scrape_configs"][0]["relabel_configs"])
    config["rule_files"] = [str(REPO / "deploy" / "alerts.yml")]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    checked = subprocess.run(
        ["promtool", "check", "config", "prometheus.yml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    # The pods it selects are the serving example's.
    serving = (REPO / "deploy" / "k8s" / "serving.yaml").read_text()
    assert 'prometheus.io/scrape: "true"' in serving


def _small_png() -> bytes:
    import io

    import numpy as np
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()
