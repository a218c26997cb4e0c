"""From a clone to a served model: a hub that cannot be reached, tracked experiments, and
the training job that ships models the way BentoML does (the demo: tests/test_demo.py)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from devtools.http_client import http_client
from devtools.in_process import Finished, run_detector
from devtools.local_server import (
    REPO,
    bentoml_serve,
    free_port,
    service_env,
    stop,
    stored_model,
)

FIT_OVERRIDES = [
    "data=synthetic",
    "data.generate.size=96",
    "data.generate.n_train=10",
    "data.generate.n_test_good=3",
    "data.generate.n_per_defect=1",
    "backbone=tiny_random",
    "backbone.resolution=96",
    "progress=false",
]


def command_env(home: Path, **extra: str) -> dict[str, str]:
    return service_env(home, **extra)


def test_an_unreachable_hub_falls_back_within_seconds(tmp_path: Path) -> None:
    """No offline setting, a hub that accepts connections and never answers: the demo must
    decide to fall back well before the hub client's own retries end (about 30 s); it takes
    about 5 s on an idle machine, 12 s with the suite's other worker busy beside it."""
    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(16)  # the kernel completes handshakes; nobody ever answers
    env = command_env(tmp_path, HF_ENDPOINT=f"http://127.0.0.1:{hole.getsockname()[1]}")
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        env.pop(name, None)
    started = time.monotonic()
    process = subprocess.Popen(
        [sys.executable, "-m", "detector", "demo", "--out", str(tmp_path / "demo")],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    seen = None
    try:
        for line in process.stderr:
            if "Falling back to a TINY RANDOM backbone" in line:
                seen = time.monotonic() - started
                break
    finally:
        stop(process)
        hole.close()
    assert seen is not None and seen < 25, seen


def run_command(home: Path, *args: str, **env: str) -> Finished:
    """`python -m detector ARGS` in this process; the demo and the Bento's training job keep
    their subprocess (the command line and the Bento's own source tree are their point)."""
    return run_detector(home, *args, **env)


def test_fit_and_evaluate_are_tracked_and_export_labels_the_run(
    tmp_path: Path, tiny_backbone_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # the embedded store, read back here

    store = f"file:{tmp_path / 'mlruns'}"
    common = [
        *FIT_OVERRIDES,
        f"data.root={tmp_path / 'data'}",
        f"backbone.name={tiny_backbone_dir}",
        f"model_dir={tmp_path / 'model'}",
    ]
    tracking = {"MLFLOW_TRACKING_URI": store, "MLFLOW_ALLOW_FILE_STORE": "true"}
    fit = run_command(tmp_path, "fit", *common, f"hydra.run.dir={tmp_path / 'fit'}", **tracking)
    assert fit.returncode == 0, fit.stderr
    evaluate = run_command(
        tmp_path, "evaluate", *common, f"hydra.run.dir={tmp_path / 'eval'}", **tracking
    )
    assert evaluate.returncode == 0, evaluate.stderr
    client = MlflowClient(tracking_uri=store)
    (experiment,) = [e for e in client.search_experiments() if e.name == "dino-inspect"]
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert set(runs) == {"fit", "evaluate"}
    fit_run, evaluate_run = runs["fit"], runs["evaluate"]
    assert fit_run.data.params["backbone.resolution"] == "96"
    assert fit_run.data.params["data.generate.n_train"] == "10"
    assert fit_run.data.metrics["bank_size"] > 0 and "threshold" in fit_run.data.metrics
    assert 0 <= evaluate_run.data.metrics["image_auroc"] <= 1
    fingerprint = json.loads((tmp_path / "model" / "bank.json").read_text())["extractor"]
    assert evaluate_run.data.tags["fingerprint"] == fingerprint["fingerprint"]
    artifacts = {a.path for a in client.list_artifacts(evaluate_run.info.run_id)}
    assert {"metrics.json", "roc.png", "overlays.png"} <= artifacts
    assert "fit_summary.json" in {a.path for a in client.list_artifacts(fit_run.info.run_id)}

    exported = run_command(tmp_path, "export", str(tmp_path / "model"))
    assert exported.returncode == 0, exported.stderr
    labels = stored_model(tmp_path, "bank-carpet:latest")["labels"]
    assert labels["mlflow_run_id"] == fit_run.info.run_id


def test_an_unreachable_tracking_server_costs_one_warning_not_the_run(
    tmp_path: Path, tiny_backbone_dir: Path
) -> None:
    started = time.monotonic()
    fit = run_command(
        tmp_path,
        "fit",
        *FIT_OVERRIDES,
        f"data.root={tmp_path / 'data'}",
        f"backbone.name={tiny_backbone_dir}",
        f"model_dir={tmp_path / 'model'}",
        f"hydra.run.dir={tmp_path / 'fit'}",
        MLFLOW_TRACKING_URI=f"http://127.0.0.1:{free_port()}",
    )
    assert fit.returncode == 0, fit.stderr
    assert (tmp_path / "model" / "bank.json").exists()
    output = fit.stdout + fit.stderr  # Hydra logs to the console on stdout
    warnings = [line for line in output.splitlines() if "experiment tracking" in line]
    assert len(warnings) == 1, output[-2000:]
    assert time.monotonic() - started < 120  # no minutes of retries


def test_the_training_job_runs_in_the_bento_and_ships_models_bentoml_imports(
    store: Path, tmp_path: Path, tiny_backbone_dir: Path
) -> None:
    """The container job's entry command, run in the built Bento's own source tree; its
    models shipped with `bentoml models export`, imported elsewhere, and served."""
    build = subprocess.run(
        [sys.executable, "-m", "bentoml", "build", "--output", "tag"],
        cwd=REPO,
        env=command_env(store),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    tag = build.stdout.strip().splitlines()[-1].removeprefix("__tag__:")
    source = store / "bentos" / "dino-inspection" / tag.split(":")[1] / "src"
    job_home, shipped = tmp_path / "job_home", tmp_path / "shipped"
    job = subprocess.run(
        [
            sys.executable,
            "-m",
            "detector",
            "pipeline",
            *FIT_OVERRIDES,
            f"data.root={tmp_path / 'data'}",
            f"backbone.name={tiny_backbone_dir}",
            f"model_dir={tmp_path / 'model'}",
            f"hydra.run.dir={tmp_path / 'job'}",
            f"+ship_to={shipped}",
        ],
        cwd=source,
        env={**command_env(job_home), "PYTHONPATH": str(source)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert job.returncode == 0, job.stderr[-3000:]
    archives = sorted(shipped.glob("*.bentomodel"))
    assert [a.name.split("-")[0] for a in archives] == ["bank", "dino"]
    serving_home = tmp_path / "serving_home"
    for archive in archives:
        imported = subprocess.run(
            [sys.executable, "-m", "bentoml", "models", "import", str(archive)],
            env=command_env(serving_home),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert imported.returncode == 0, imported.stderr
    image = next((tmp_path / "data" / "carpet" / "test" / "good").glob("*.png"))
    with bentoml_serve(serving_home, tmp_path / "serve.log") as url:
        files = {"image": (image.name, image.read_bytes(), "image/png")}
        answer = http_client.post(f"{url}/inspect", files=files, timeout=60)
    assert answer.status_code == 200 and answer.json()["threshold"] > 0
