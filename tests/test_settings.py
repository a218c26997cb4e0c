"""Service settings from the environment: defaults chosen by measurement, overrides honoured."""

from __future__ import annotations

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


def test_a_malformed_number_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INSPECT_MAX_BATCH_SIZE", "four")
    with pytest.raises(ValueError):
        Settings.from_env()


def test_products_and_the_retired_bank_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INSPECT_PRODUCTS", " carpet, line3-grey ,")
    monkeypatch.setenv("INSPECT_BANK_CACHE_MB", "64")
    settings = Settings.from_env()
    assert settings.products == ["carpet", "line3-grey"] and settings.bank_cache_mb == 64
    monkeypatch.setenv("INSPECT_BANK_MODEL", "inspection-bank:latest")
    with pytest.raises(UserError, match="INSPECT_PRODUCTS"):
        Settings.from_env()
