"""Service settings from the environment: defaults chosen by measurement, overrides honoured."""

from __future__ import annotations

from pathlib import Path

import pytest

from detector.errors import UserError
from detector.serving.settings import Settings, default_max_batch_size


def test_batching_is_off_on_cpu_and_on_for_a_gpu_by_default() -> None:
    assert default_max_batch_size("cpu") == 1
    assert default_max_batch_size("cuda") == 8
    assert default_max_batch_size("cuda:1") == 8


def test_batch_size_follows_the_device_unless_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("INSPECT_MAX_BATCH_SIZE", raising=False)
    monkeypatch.setenv("INSPECT_DEVICE", "cpu")
    assert Settings.from_env().max_batch_size == 1
    monkeypatch.setenv("INSPECT_DEVICE", "cuda")
    assert Settings.from_env().max_batch_size == 8
    monkeypatch.setenv("INSPECT_MAX_BATCH_SIZE", "3")
    assert Settings.from_env().max_batch_size == 3


@pytest.mark.parametrize(
    ("name", "value", "says"),
    [
        ("INSPECT_MAX_QUEUE", "0", "at least 1"),  # was 16, silently
        ("INSPECT_MAX_QUEUE", "sixteen", "whole number"),
        ("INSPECT_THREADS", "-2", "at least 1"),
        ("INSPECT_BANK_REFRESH_S", "nan", "at least 0"),
        ("INSPECT_DRIFT_ALERT_LEVEL", "3", "at most 1"),
        ("INSPECT_RECORDS", "maybe", "true or false"),
        ("INSPECT_ANONYMOUS_SCORING", "yes please", "true or false"),  # was 'no', silently
        ("INSPECT_KEEP_IMAGES", "some", "one of"),
    ],
)
def test_a_setting_out_of_its_range_is_refused_by_name(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, says: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(UserError, match=says) as refused:
        Settings.from_env()
    assert str(refused.value).startswith(name)


def test_keep_versions_is_read_by_the_same_reader(monkeypatch: pytest.MonkeyPatch) -> None:
    from detector.banks.products import keep_versions

    monkeypatch.setenv("INSPECT_KEEP_VERSIONS", "0")
    with pytest.raises(UserError, match="INSPECT_KEEP_VERSIONS must be at least 1"):
        keep_versions()
    monkeypatch.setenv("INSPECT_KEEP_VERSIONS", "7")
    assert keep_versions() == 7


def test_products_and_the_retired_bank_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INSPECT_PRODUCTS", " carpet, line3-grey ,")
    monkeypatch.setenv("INSPECT_BANK_CACHE_MB", "64")
    settings = Settings.from_env()
    assert settings.products == ["carpet", "line3-grey"] and settings.bank_cache_mb == 64
    monkeypatch.setenv("INSPECT_BANK_MODEL", "inspection-bank:latest")
    with pytest.raises(UserError, match="INSPECT_PRODUCTS"):
        Settings.from_env()


def test_the_thread_count_falls_back_where_there_is_no_cpu_affinity(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """macOS and Windows have no os.sched_getaffinity; importing the service there used it."""
    import os

    from detector.threads import usable_cpus

    assert usable_cpus() == len(os.sched_getaffinity(0))
    monkeypatch.delattr(os, "sched_getaffinity")
    monkeypatch.setattr(os, "cpu_count", lambda: 6)
    monkeypatch.delenv("INSPECT_THREADS", raising=False)
    assert usable_cpus() == 6
    assert Settings.from_env().num_threads == 6


def test_the_model_store_is_found_the_same_way_everywhere(tmp_path: Path) -> None:
    """A Bento's packed models in its image, a shared store seeded from them, or the home's."""
    from detector.banks.location import choose, seed

    home, bento = tmp_path / "home" / "models", tmp_path / "bento"
    packed = bento / "models"
    (packed / "bank-carpet" / "v3").mkdir(parents=True)
    (packed / "bank-carpet" / "v3" / "index.faiss").write_bytes(b"packed")
    (packed / "bank-carpet" / "latest").write_text("v3")
    assert choose(home, home, {}) == (home, None)
    assert choose(home, home, {"BENTO_PATH": str(bento)}) == (packed, None)
    assert choose(packed, home, {}) == (packed, None)  # `bentoml serve` of a Bento chose it
    shared = tmp_path / "volume"
    chosen, source = choose(
        home, home, {"BENTO_PATH": str(bento), "INSPECT_MODEL_STORE": str(shared)}
    )
    assert (chosen, source) == (shared, packed)
    (shared / "bank-carpet" / "v3").mkdir(parents=True)
    (shared / "bank-carpet" / "v3" / "index.faiss").write_bytes(b"made by a replica")
    (packed / "dino-backbone" / "abc").mkdir(parents=True)
    assert seed(shared, packed) == ["dino-backbone:abc"]
    assert (shared / "bank-carpet" / "v3" / "index.faiss").read_bytes() == b"made by a replica"
    assert seed(shared, packed) == [], "seeding twice copies nothing"


def test_auto_is_the_cpu_without_an_nvidia_driver(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where no driver is installed, 'auto' needs no torch to know it means the CPU; where
    one is, torch decides (a driver without a usable GPU is still the CPU)."""
    import torch

    from detector import extractor as backbone

    monkeypatch.setattr(backbone, "_nvidia_driver_present", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # never asked
    assert backbone.device_type("auto") == "cpu"
    monkeypatch.setattr(backbone, "_nvidia_driver_present", lambda: True)
    assert backbone.device_type("auto") == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert backbone.device_type("auto") == "cpu"
    assert backbone.device_type("cuda:1") == "cuda" and backbone.device_type("cpu") == "cpu"


def test_the_service_starts_without_torch_where_only_scoring_needs_it(store: Path) -> None:
    """`bentoml serve` and the API worker import service.py but never run the backbone:
    without torch (and transformers) they start seconds sooner on a cold container."""
    import subprocess
    import sys

    from devtools.local_server import REPO, service_env

    code = "import sys, service; print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    shown = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env={**service_env(store), "INSPECT_DEVICE": "cpu"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert shown.stdout.strip().splitlines()[-1] == "[]", shown.stdout


def test_products_prints_a_short_history_table_and_json_on_request(store: Path) -> None:
    import json

    from devtools.in_process import run_detector

    def products(*args: str) -> str:
        shown = run_detector(store, "products", *args)
        assert shown.returncode == 0, shown.stderr[-2000:]
        return shown.stdout

    lines = products("carpet").splitlines()
    assert lines[0].split()[:4] == ["version", "rows", "threshold", "promise"]
    assert lines[1].split()[0] == "v1" and " fit" in lines[1]
    document = json.loads(products("carpet", "--json"))
    assert document[0]["version"] == "v1" and document[0]["bank_rows"] > 0
    assert products().splitlines()[1].startswith("carpet v1")


def test_the_batch_job_asks_for_product_by_its_option(monkeypatch: pytest.MonkeyPatch) -> None:
    """Several products and none named: the batch job's sentence names --product, not the
    HTTP form field."""
    from detector.banks import models
    from detector.banks.products import UnknownProductError

    monkeypatch.setattr(models, "list_products", lambda: ["carpet", "tile"])
    with pytest.raises(UnknownProductError, match="--product") as raised:
        models.load_pair()
    assert "form field" not in str(raised.value) and "carpet, tile" in str(raised.value)
