"""The batch job: same scores as predict and the service, crash-safe resume, shards, errors."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from batch.files import Shard, find_images
from batch.job import heatmap_path
from batch.results import ResultJournal, read_rows
from detector.anomaly_detector import AnomalyDetector
from detector.serving.local_server import REPO, bentoml_serve, service_env


@pytest.fixture(scope="module")
def inspection_folder(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An MVTec test folder plus a corrupt PNG, a text file and an upper-case extension."""
    folder = tmp_path_factory.mktemp("incoming") / "test"
    shutil.copytree(synthetic_root / "carpet" / "test", folder)
    (folder / "good" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64)
    (folder / "notes.txt").write_text("not an image")
    shutil.copy(folder / "good" / "000.png", folder / "good" / "UPPER.PNG")
    shutil.copytree(synthetic_root / "carpet" / "ground_truth", folder.parent / "ground_truth")
    return folder


def run_batch(store: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "batch", *args, "--no-progress"],
        cwd=REPO,
        env=service_env(store),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def scores_by_path(out: Path) -> dict[str, float]:
    return {
        row["path"]: row["score"]
        for row in read_rows(out / "results.jsonl")
        if not row.get("error")
    }


def test_batch_job_scores_like_predict_and_reports_bad_files(
    store: Path, inspection_folder: Path, fitted_detector: AnomalyDetector, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    result = run_batch(store, str(inspection_folder), "--out", str(out), "--heatmaps", "--evaluate")
    assert result.returncode == 1, result.stderr  # one file failed
    images, _ = find_images(inspection_folder)
    rows = read_rows(out / "results.jsonl")
    assert sorted(row["path"] for row in rows) == images  # every image exactly once
    csv_paths = [line.split(",")[0] for line in (out / "results.csv").read_text().splitlines()[1:]]
    assert sorted(csv_paths) == images

    failed = [row for row in rows if row.get("error")]
    assert [row["path"] for row in failed] == ["good/corrupt.png"]
    assert "corrupt" in failed[0]["error"] or "not an image" in failed[0]["error"]

    scored = scores_by_path(out)
    expected = fitted_detector.predict([inspection_folder / p for p in scored], with_maps=False)
    for (path, score), want in zip(scored.items(), expected, strict=True):
        assert score == pytest.approx(want.score, abs=1e-5), path
        assert (out / "heatmaps" / path).with_suffix(".png").exists()

    summary = json.loads((out / "summary.json").read_text())
    assert summary["failed"] == 1 and summary["scored"] == len(images) - 1
    assert summary["non_image_files"] == 1 and summary["non_image_examples"] == ["notes.txt"]
    assert (out / "scores.png").exists()
    assert summary["evaluation"]["image_auroc"] >= 0.9
    assert (out / "evaluation" / "metrics.json").exists()


def test_url_mode_gives_the_same_scores_as_in_process(
    store: Path, inspection_folder: Path, tmp_path: Path
) -> None:
    local, remote = tmp_path / "local", tmp_path / "remote"
    run_batch(store, str(inspection_folder), "--out", str(local))
    with bentoml_serve(store, tmp_path / "serve.log") as url:
        result = run_batch(store, str(inspection_folder), "--out", str(remote), "--url", url)
        heat = run_batch(
            store,
            str(inspection_folder / "color"),
            "--out",
            str(tmp_path / "h"),
            "--url",
            url,
            "--heatmaps",
        )
    assert result.returncode == 1, result.stderr
    local_scores, remote_scores = scores_by_path(local), scores_by_path(remote)
    assert local_scores.keys() == remote_scores.keys() and local_scores
    for path, score in local_scores.items():
        assert remote_scores[path] == pytest.approx(score, abs=1e-5)
    remote_failures = [row for row in read_rows(remote / "results.jsonl") if row.get("error")]
    assert [row["path"] for row in remote_failures] == ["good/corrupt.png"]
    assert heat.returncode == 0, heat.stderr
    assert len(list((tmp_path / "h" / "heatmaps").glob("*.png"))) == 3


def test_kill_9_then_resume_scores_every_image_exactly_once(store: Path, tmp_path: Path) -> None:
    folder = tmp_path / "many"
    rng = np.random.default_rng(0)
    for i in range(300):
        sub = folder / f"line{i % 3}"
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), np.uint8)).save(sub / f"{i:04d}.png")
    out = tmp_path / "out"
    journal = out / "results.jsonl"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "batch",
            str(folder),
            "--out",
            str(out),
            "--batch-size",
            "1",
            "--no-progress",
        ],
        cwd=REPO,
        env=service_env(store),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if journal.exists() and journal.read_bytes().count(b"\n") >= 20:
            break
        time.sleep(0.005)
    assert process.poll() is None, "the job finished before it could be killed"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    done_before = len(read_rows(journal))
    assert 20 <= done_before < 300
    with journal.open("ab") as handle:  # a torn row, as a kill during a write would leave
        handle.write(b'{"path": "line0/0000.png", "sco')

    result = run_batch(store, str(folder), "--out", str(out))
    assert result.returncode == 0, result.stderr
    rows = read_rows(journal)
    paths = [row["path"] for row in rows]
    assert len(paths) == len(set(paths)) == 300
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped_already_done"] == done_before
    assert summary["scored_this_run"] == 300 - done_before


def test_shards_cover_every_file_once_and_merge(
    store: Path, inspection_folder: Path, tmp_path: Path
) -> None:
    names = [f"folder{i % 7}/image{i}.png" for i in range(1000)]
    owners = [[s for s in range(4) if Shard(s, 4).owns(name)] for name in names]
    assert all(len(owner) == 1 for owner in owners)
    assert all(Shard(o[0], 4).owns(n) for o, n in zip(owners, names, strict=True))  # stable
    out = tmp_path / "sharded"
    for index in range(2):
        run_batch(store, str(inspection_folder), "--out", str(out), "--shard", f"{index}/2")
    merged = subprocess.run(
        [sys.executable, "-m", "batch", "merge", str(out)],
        cwd=REPO,
        env=service_env(store),
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(merged.stdout)["images"] == len(find_images(inspection_folder)[0])
    paths = [row["path"] for row in read_rows(out / "results.jsonl")]
    assert sorted(paths) == find_images(inspection_folder)[0]


def test_shard_from_job_engines(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLOUD_RUN_TASK_INDEX", "2")
    monkeypatch.setenv("CLOUD_RUN_TASK_COUNT", "5")
    assert Shard.from_environment() == Shard(2, 5)
    monkeypatch.delenv("CLOUD_RUN_TASK_INDEX")
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "1")
    with pytest.raises(ValueError, match="BATCH_SHARD_COUNT"):
        Shard.from_environment()
    monkeypatch.setenv("BATCH_SHARD_COUNT", "3")
    assert Shard.from_environment() == Shard(1, 3)
    with pytest.raises(ValueError):
        Shard.parse("3/3")


def test_journal_drops_a_torn_tail_and_retries_errors(tmp_path: Path) -> None:
    path = tmp_path / "results.jsonl"
    path.write_text('{"path": "a.png", "score": 1}\n{"path": "b.png", "error": "x"}\n{"path": "c')
    journal = ResultJournal(path)
    assert journal.done == {"a.png"}  # b failed: it is tried again
    journal.append({"path": "b.png", "score": 2})
    journal.close()
    assert [row["path"] for row in journal.compact()] == ["a.png", "b.png"]
    assert path.read_text().count("\n") == 2


def test_heatmap_paths_cannot_escape_the_output(tmp_path: Path) -> None:
    assert heatmap_path(tmp_path, "a/b.jpg") == (tmp_path / "heatmaps" / "a" / "b.png").resolve()
    with pytest.raises(ValueError, match="outside"):
        heatmap_path(tmp_path, "../../etc/passwd")


@pytest.mark.parametrize("case", ["empty_folder", "missing_model", "unwritable_output"])
def test_fatal_problems_give_one_sentence_and_exit_2(
    case: str, store: Path, inspection_folder: Path, tmp_path: Path
) -> None:
    home, folder, out = store, inspection_folder, tmp_path / "out"
    if case == "empty_folder":
        folder = tmp_path / "empty"
        folder.mkdir()
    elif case == "missing_model":
        home = tmp_path / "empty_home"
    else:
        out = tmp_path / "a_file"
        out.write_text("not a folder")
    result = run_batch(home, str(folder), "--out", str(out))
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert "Traceback" not in result.stderr
    expected = {
        "empty_folder": "holds no files",
        "missing_model": "is not in the BentoML model store",
        "unwritable_output": "Cannot write",
    }[case]
    assert expected in errors[0]
