"""The deployment files: deploy/cloudrun.sh run for real with stand-ins for gcloud, bentoml
and docker on the PATH (what it would deploy is checked, not its text), and the Kubernetes
examples against the API's schemas and the rules the API server adds to them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from devtools.local_server import REPO

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
        "SERVICE_ACCOUNT": "inspection@plant-7.iam.gserviceaccount.com",
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
        API_KEYS_SECRET="inspection-keys:7",
        RECORDS_DB_SECRET="records-url:1",
        CLOUDSQL_INSTANCE="plant-7:europe-west1:records",
        INSPECT_PRODUCTS="carpet,tile",
    )
    assert done.returncode == 0, done.stderr
    (run,) = [line for line in calls.splitlines() if line.startswith("gcloud run deploy")]
    assert (
        "--set-secrets INSPECT_ADMIN_KEY=inspection-admin:3,"
        "INSPECT_API_KEYS=inspection-keys:7,INSPECT_RECORDS_DB=records-url:1"
    ) in run
    assert "--set-env-vars" not in run and "--env-vars-file" in run
    assert "--region europe-west1" in run and "--no-allow-unauthenticated" in run
    assert "--service-account inspection@plant-7.iam.gserviceaccount.com" in run
    assert "--add-cloudsql-instances plant-7:europe-west1:records" in run
    assert "INSPECT_PRODUCTS: 'carpet,tile'" in env_file
    assert "INSPECT_ALLOWED_HOSTS: '.run.app'" in env_file
    assert "INSPECT_RECORDS_MIGRATE: 'check'" in env_file
    assert "INSPECT_KEEP_IMAGES: 'none'" in env_file
    assert "KEY" not in env_file.replace("INSPECT_THREADS", "")


@pytest.mark.parametrize("secret", ["inspection-admin", "inspection-admin:latest"])
def test_a_secret_without_a_pinned_version_is_refused(tmp_path: Path, secret: str) -> None:
    done, calls, _ = deploy(tmp_path, ADMIN_KEY_SECRET=secret)
    assert done.returncode == 2 and "pinned version" in done.stderr and calls == ""


def test_the_deploy_stays_within_cloud_runs_limits(tmp_path: Path) -> None:
    """Cloud Run refuses requests over 32 MiB and startup probes longer than 240 s in all;
    without a records database, records are off rather than kept in one instance's memory."""
    done, calls, env_file = deploy(tmp_path, ADMIN_KEY_SECRET="admin:1", AUTH="public")
    assert done.returncode == 0, done.stderr
    (run,) = [line for line in calls.splitlines() if line.startswith("gcloud run deploy")]
    assert "--allow-unauthenticated" in run and "--service-account" in run
    settings = dict(
        line.split(": ", 1) for line in env_file.splitlines() if line.startswith("INSPECT_")
    )
    for limit in ("INSPECT_MAX_BYTES", "INSPECT_MAX_BATCH_BYTES", "INSPECT_MAX_CHANGE_BYTES"):
        assert int(settings[limit].strip("'")) < 32 * 1024 * 1024, limit
    assert settings["INSPECT_RECORDS"] == "'off'" and "records are off" in done.stderr
    probe = run.split("--startup-probe ")[1].split()[0]
    fields = dict(item.split("=") for item in probe.split(",")[1:])
    total = int(fields["initialDelaySeconds"]) + int(fields["periodSeconds"]) * int(
        fields["failureThreshold"]
    )
    assert total <= 240 and int(fields["timeoutSeconds"]) <= int(fields["periodSeconds"])


def test_a_deploy_without_a_service_account_is_refused(tmp_path: Path) -> None:
    done, calls, _ = deploy(tmp_path, ADMIN_KEY_SECRET="admin:1", SERVICE_ACCOUNT="")
    assert done.returncode != 0 and "SERVICE_ACCOUNT" in done.stderr and calls == ""


K8S = REPO / "deploy" / "k8s"


def test_the_kubernetes_examples_pass_the_schemas_and_the_api_server_rules() -> None:
    from deploy.kube import check

    assert check(sorted(K8S.glob("*.yaml"))) == []


def test_the_old_indexed_job_is_refused_for_what_the_api_server_refused(tmp_path: Path) -> None:
    """27d0ec0's example passed a schema validator, yet the API server refuses
    restartPolicy OnFailure with a pod failure policy, and its claim was never defined."""
    from deploy.kube import check

    old = tmp_path / "old-job.yaml"
    old.write_text(
        """
apiVersion: batch/v1
kind: Job
metadata: {name: nightly-inspection}
spec:
  completionMode: Indexed
  completions: 8
  parallelism: 8
  backoffLimit: 16
  podFailurePolicy:
    rules:
      - action: FailJob
        onExitCodes: {containerName: inspect, operator: In, values: [2]}
  template:
    spec:
      restartPolicy: OnFailure
      containers:
        - name: inspect
          image: example/inspection:1
          command: ["python", "-m", "batch", "/data/in", "--threads", "$(THREADS)"]
          resources:
            requests: {cpu: "4", memory: 6Gi}
          volumeMounts:
            - {name: data, mountPath: /data}
      volumes:
        - name: data
          persistentVolumeClaim: {claimName: inspection-data}
"""
    )
    problems = "\n".join(check([old]))
    for expected in (
        "podFailurePolicy needs restartPolicy Never",
        "$(THREADS) is not in its env",
        "no memory limit",
        "no PersistentVolumeClaim 'inspection-data'",
    ):
        assert expected in problems, problems
    typo = tmp_path / "typo.yaml"
    typo.write_text(old.read_text().replace("completions: 8", "completion: 8"))
    assert "completion" in "\n".join(check([typo])), "strict: unknown fields are errors"


def test_the_slim_step_removes_only_what_serving_never_reads(tmp_path: Path) -> None:
    """deploy/Dockerfile.template's step: headers, test suites and test programs go, the
    modules and libraries stay; outside an image build it refuses to touch site-packages."""
    from detector.serving import slim_image

    site = tmp_path / "site-packages"
    kept = [
        "torch/__init__.py",
        "torch/lib/libtorch_cpu.so",
        "torch/bin/torch_shm_manager",
        "torch/testing/__init__.py",
        "numpy/testing/__init__.py",
    ]
    removed = [
        "torch/include/ATen/ATen.h",
        "torch/test/test_api",
        "torch/bin/test_jit",
        "torch/bin/TCPStoreTest",
        "torch/bin/protoc",
        "scipy/stats/tests/test_stats.py",
        "torch/__pycache__/__init__.cpython-311.pyc",
    ]
    for name in kept + removed:
        (site / name).parent.mkdir(parents=True, exist_ok=True)
        (site / name).write_bytes(b"x" * 10)
    assert slim_image.remove_unread(site) == 10 * len(removed)
    assert all((site / name).exists() for name in kept)
    assert not any((site / name).exists() for name in removed)
    refused = subprocess.run(
        [sys.executable, "-m", "detector.serving.slim_image"],
        env={**os.environ, "BENTOML_CONTAINERIZED": ""},
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert refused.returncode == 2 and "only in an image build" in refused.stdout
