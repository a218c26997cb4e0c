"""Two `bentoml serve` replicas sharing one model store and one real PostgreSQL records
database, as several containers on a shared volume run: a bank version made on one is
served by both within seconds, under load, with no failed request; every inspection is
recorded exactly once; and each replica's /metrics counts what that replica did."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from detector.data.mvtec import MVTecCategory
from detector.serving.replicas import check_records_location, on_network_filesystem
from devtools.http_client import http_client
from devtools.local_server import bentoml_serve, kill_server

KEYS = "cam=line:replica-line-key-0123,ops=admin:replica-admin-key-012"
LINE = {"X-API-Key": "replica-line-key-0123"}
ADMIN = {"X-API-Key": "replica-admin-key-012"}


def verdict_total(url: str) -> float:
    total = 0.0
    for line in http_client.get(f"{url}/metrics", timeout=30).text.splitlines():
        if line.startswith("inspection_verdicts_total{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def answers_after(seen: list[tuple[float, str, str]], url: str, moment: float) -> int:
    return sum(t > moment and u == url for t, u, _ in list(seen))


def wait_until(condition: Callable[[], bool], failures: list[str], timeout: float = 60.0) -> None:
    """Poll `condition` while the load runs; fail at the load's first failed request, or
    after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert not failures, failures[:3]
        assert time.monotonic() < deadline, f"not within {timeout:.0f} s"
        time.sleep(0.1)


def job_state(url: str, location: str) -> str:
    return http_client.get(f"{url}{location}", headers=ADMIN, timeout=30).json()["state"]


def test_two_replicas_share_versions_and_records_but_not_metrics(
    store: Path, postgres: Any, synthetic_dataset: MVTecCategory, tmp_path: Path
) -> None:
    import psycopg

    admin_dsn = f"host=127.0.0.1 port={postgres.port} user=postgres dbname=postgres"
    with psycopg.connect(admin_dsn, autocommit=True) as connection:
        connection.execute("DROP DATABASE IF EXISTS replica_records")
        connection.execute("CREATE DATABASE replica_records")
    records_db = postgres.url.rsplit("/", 1)[0] + "/replica_records"
    images = [sample.path.read_bytes() for sample in synthetic_dataset.test_samples()]
    settings = {
        "INSPECT_API_KEYS": KEYS,
        "INSPECT_RECORDS_DB": records_db,
        "INSPECT_BANK_REFRESH_S": "0.5",
        "INSPECT_THREADS": "1",
    }
    with ExitStack() as stack:
        # Started together, as a rollout starts its pods: both migrate the records schema
        # at once, and neither may fail for it.
        servers = [bentoml_serve(store, tmp_path / f"replica{n}.log", **settings) for n in (0, 1)]
        with ThreadPoolExecutor(2) as pool:
            urls = list(pool.map(stack.enter_context, servers))
        answered: Counter[str] = Counter()
        seen: list[tuple[float, str, str]] = []  # (time, replica, bank version)
        failures: list[str] = []
        record_ids: list[str] = []
        stop = threading.Event()

        def client(number: int) -> None:
            url = urls[number % 2]
            count = 0
            while not stop.is_set():
                files = {"image": ("p.png", images[count % len(images)], "image/png")}
                count += 1
                response = http_client.post(f"{url}/inspect", files=files, headers=LINE, timeout=60)
                if response.status_code != 200:
                    failures.append(f"{url}: {response.status_code} {response.text[:200]}")
                    continue
                body = response.json()
                answered[url] += 1
                record_ids.append(body["record_id"])
                seen.append((time.monotonic(), url, body["models"]["bank"]))

        with ThreadPoolExecutor(4) as pool:
            try:
                for number in range(4):
                    pool.submit(client, number)
                # Load on both replicas first (each has answered), then the change under it.
                wait_until(lambda: all(answered[url] >= 2 for url in urls), failures)
                change = http_client.post(
                    f"{urls[0]}/products/carpet/threshold",
                    json={"target": 0.2, "reason": "replica test"},
                    headers=ADMIN,
                    timeout=120,
                )
                changed_at = time.monotonic()
                assert change.status_code == 200, change.text
                new_bank = f"bank-carpet:{change.json()['version']}"
                # The load goes on until each replica has answered 3 times, 5 s after the change.
                wait_until(
                    lambda: all(answers_after(seen, url, changed_at + 5) >= 3 for url in urls),
                    failures,
                )
            finally:
                stop.set()  # the clients end, also when a wait above fails
        assert failures == []
        for url in urls:  # each replica serves the new version within 5 s of the change
            after = [(t, bank) for t, u, bank in seen if u == url and t > changed_at + 5]
            assert after and all(bank == new_bank for _, bank in after), url
            assert any(bank == new_bank for t, u, bank in seen if u == url)
        # Each replica's /metrics counts its own answers, not the other's.
        for url in urls:
            assert verdict_total(url) == answered[url], url
        # Every inspection recorded exactly once, by whichever replica answered it.
        deadline = time.monotonic() + 60
        with psycopg.connect(admin_dsn.replace("dbname=postgres", "dbname=replica_records")) as db:
            while True:
                count, distinct = db.execute(
                    "SELECT count(*), count(DISTINCT id) FROM inspections"
                ).fetchone()
                if count >= len(record_ids) or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            stored = {row[0] for row in db.execute("SELECT id FROM inspections")}
        assert count == distinct == len(record_ids) and stored == set(record_ids)
        # A new product's fit on replica 0, which is killed mid-fit (a failed machine, a pod
        # evicted past its grace period): replica 1, on the same store, sees no half-made
        # product, answers for the job as a restarted server does, and the name is free.
        train = synthetic_dataset.train_paths()[:24]
        files = [("images", (path.name, path.read_bytes(), "image/png")) for path in train]
        started = http_client.post(
            f"{urls[0]}/products", files=files, data={"name": "line9"}, headers=ADMIN, timeout=60
        )
        assert started.status_code == 202, started.text
        kill_server(urls[0])
        job = http_client.get(f"{urls[1]}{started.headers['location']}", headers=ADMIN, timeout=30)
        assert job.status_code == 404 and "a fit cut off by a restart saved nothing" in job.text
        listed = http_client.get(f"{urls[1]}/products", headers=ADMIN, timeout=30).json()
        assert [entry["name"] for entry in listed] == ["carpet"]
        again = http_client.post(
            f"{urls[1]}/products", files=files, data={"name": "line9"}, headers=ADMIN, timeout=60
        )
        assert again.status_code == 202, again.text
        deadline = time.monotonic() + 60
        while (state := job_state(urls[1], again.headers["location"])) == "running":
            assert time.monotonic() < deadline, "the fit never ended"
            time.sleep(0.1)
        assert state == "done"
    for n in (0, 1):
        log = (tmp_path / f"replica{n}.log").read_text()
        assert "access: keys required (line 1, reviewer 0, admin 1)" in log
        assert "replica-admin-key" not in log and "replica-line-key" not in log


MOUNTS = """\
/dev/vda / ext4 rw,relatime 0 0
nfs.plant:/export/bentoml /srv/bentoml nfs4 rw,relatime 0 0
tmpfs /srv/bentoml/local tmpfs rw 0 0
s3fs /mnt/bucket fuse.s3fs rw 0 0
"""


def test_sqlite_records_on_a_network_file_system_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import dataclasses

    from detector.errors import UserError
    from detector.serving.settings import Settings

    assert on_network_filesystem(Path("/srv/bentoml/records"), MOUNTS)
    assert on_network_filesystem(Path("/mnt/bucket/x"), MOUNTS)
    assert not on_network_filesystem(Path("/srv/bentoml/local/records"), MOUNTS)
    assert not on_network_filesystem(Path("/srv/bentomlx"), MOUNTS)
    settings = dataclasses.replace(Settings.from_env(), records_dir="/srv/bentoml/records")
    with pytest.raises(UserError, match="INSPECT_RECORDS_DB"):
        check_records_location(settings, MOUNTS)
    check_records_location(dataclasses.replace(settings, records_db="postgresql://db/x"), MOUNTS)
    check_records_location(dataclasses.replace(settings, records_dir=str(tmp_path)), MOUNTS)
