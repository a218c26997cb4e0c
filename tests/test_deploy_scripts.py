"""deploy/cloudrun.sh run for real, with stand-ins for gcloud, bentoml and docker on the
PATH that record how they were called: what it would deploy is checked, not its text."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from detector.serving.local_server import REPO

STAND_IN = """#!/usr/bin/env bash
echo "$(basename "$0") $*" >> "$CALLS"
for arg in "$@"; do
  case "$prev" in --env-vars-file) cp "$arg" "$CALLS.env" ;; esac
  prev=$arg
done
[ "$(basename "$0") $1" = "bentoml build" ] && echo "__tag__:dino-inspection:abc123"
exit 0
"""
SECRET = "a-key-that-must-never-travel-in-plain"


def deploy(tmp_path: Path, **env: str) -> tuple[subprocess.CompletedProcess, str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for tool in ("gcloud", "bentoml", "docker"):
        (bin_dir / tool).write_text(STAND_IN)
        (bin_dir / tool).chmod(0o755)
    calls = tmp_path / "calls.log"
    calls.write_text("")
    clean = {k: v for k, v in os.environ.items() if not k.startswith("INSPECT_")}
    environment = {
        **clean,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "CALLS": str(calls),
        "PROJECT_ID": "plant-7",
        **env,
    }
    done = subprocess.run(
        ["bash", str(REPO / "deploy" / "cloudrun.sh")],
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
    )
    env_file = Path(f"{calls}.env")
    return done, calls.read_text(), env_file.read_text() if env_file.exists() else ""


def test_a_keyless_deploy_is_refused_before_anything_is_built(tmp_path: Path) -> None:
    done, calls, _ = deploy(tmp_path)
    assert done.returncode == 2 and "no key" in done.stderr
    assert calls == "", "nothing built, pushed or deployed"


@pytest.mark.parametrize("setting", ["INSPECT_ADMIN_KEY", "INSPECT_API_KEYS", "INSPECT_RECORDS_DB"])
def test_a_key_or_database_url_in_the_environment_is_refused(tmp_path: Path, setting: str) -> None:
    done, calls, _ = deploy(tmp_path, ADMIN_KEY_SECRET="admin:2", **{setting: SECRET})
    assert done.returncode == 2 and "Secret Manager" in done.stderr and calls == ""
    assert SECRET not in done.stderr


def test_keys_go_as_secrets_and_settings_with_commas_stay_whole(tmp_path: Path) -> None:
    done, calls, env_file = deploy(
        tmp_path,
        ADMIN_KEY_SECRET="inspection-admin:3",
        API_KEYS_SECRET="inspection-keys",
        RECORDS_DB_SECRET="records-url:1",
        INSPECT_PRODUCTS="carpet,tile",
    )
    assert done.returncode == 0, done.stderr
    (run,) = [line for line in calls.splitlines() if line.startswith("gcloud run deploy")]
    assert (
        "--set-secrets INSPECT_ADMIN_KEY=inspection-admin:3,"
        "INSPECT_API_KEYS=inspection-keys:latest,INSPECT_RECORDS_DB=records-url:1"
    ) in run
    assert "--set-env-vars" not in run and "--env-vars-file" in run
    assert "INSPECT_PRODUCTS: 'carpet,tile'" in env_file
    assert "INSPECT_ALLOWED_HOSTS: '.run.app'" in env_file
    assert "KEY" not in env_file.replace("INSPECT_THREADS", "")
