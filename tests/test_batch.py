"""The batch job: same scores as predict and the service, crash-safe resume, shards, errors."""

from __future__ import annotations

import json
import logging
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

from batch.__main__ import main as batch_main
from batch.files import Shard, find_images
from batch.job import is_current
from batch.outputs import heatmap_path
from batch.results import ResultJournal, read_rows
from detector.anomaly_detector import AnomalyDetector
from devtools.in_process import Finished, run_detector, run_main
from devtools.local_server import REPO, bentoml_serve, service_env


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


def run_batch(store: Path, *args: str, **environment: str) -> Finished:
    """`python -m batch ARGS` in this process (torch is imported once per worker, not once per
    run); the kill, SIGTERM and command-line tests below run the real subprocess."""
    return run_main(batch_main, store, *args, "--no-progress", **environment)


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
    assert result.returncode == 0, result.stderr  # finished; the one failure is recorded
    images = find_images(inspection_folder).images
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
        assert (out / "heatmaps" / f"{path}.png").exists()

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
    assert result.returncode == 0, result.stderr
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
    for i in range(150):  # killed after 20: the job is still well short of the end
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
    assert 20 <= done_before < 150
    with journal.open("ab") as handle:  # a torn row, as a kill during a write would leave
        handle.write(b'{"path": "line0/0000.png", "sco')

    result = run_batch(store, str(folder), "--out", str(out))
    assert result.returncode == 0, result.stderr
    rows = read_rows(journal)
    paths = [row["path"] for row in rows]
    assert len(paths) == len(set(paths)) == 150
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped_already_done"] == done_before
    assert summary["scored_this_run"] == 150 - done_before


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
    assert json.loads(merged.stdout)["images"] == len(find_images(inspection_folder).images)
    paths = [row["path"] for row in read_rows(out / "results.jsonl")]
    assert sorted(paths) == find_images(inspection_folder).images


def test_a_shard_that_owns_no_file_finishes_and_merge_wants_every_shard(
    store: Path, tmp_path: Path
) -> None:
    """2 images on 8 shards: the shards that own none write empty results and exit 0 (an
    Indexed Job would otherwise fail); merging before every shard has results is refused."""
    folder = small_folder(tmp_path / "in", count=2)
    images = find_images(folder).images
    empty = next(i for i in range(8) if not any(Shard(i, 8).owns(p) for p in images))
    out = tmp_path / "out"
    result = run_batch(store, str(folder), "--out", str(out), "--shard", f"{empty}/8")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["images"] == 0
    assert (out / f"results-shard-{empty:04d}-of-0008.jsonl").exists()
    refused = run_batch(store, "merge", str(out))
    assert refused.returncode == 2 and "of 8 have no results yet" in refused.stderr


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


def test_journal_drops_a_torn_tail_skips_a_damaged_line_and_retries_errors(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "results.jsonl"
    path.write_text(
        '{"path": "a.png", "score": 1}\n{"path": "b.png", "error": "x"}\n'
        '{"path": "d.png", "sco\x00\n{"path": "c'
    )
    # The journal's own logger, at WARNING whatever an earlier test in this worker left on
    # the root logger (once, in a whole run, this caught nothing without it).
    with caplog.at_level(logging.WARNING, logger="batch.results"):
        journal = ResultJournal(path)
    assert "line 3 skipped" in caplog.text  # a complete line that does not decode
    assert set(journal.latest) == {"a.png", "b.png"}
    identity = {"input_root": None}
    models = {"backbone": "", "bank": ""}
    assert not is_current(journal.latest["b.png"], identity, models)  # failed: tried again
    journal.append({"path": "b.png", "score": 2})
    journal.close()
    assert [row["path"] for row in journal.compact()] == ["a.png", "b.png"]
    assert path.read_text().count("\n") == 2


def test_compaction_fsyncs_the_new_file_and_its_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[str] = []
    real_fsync = os.fsync
    monkeypatch.setattr(
        os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real_fsync(fd))
    )
    path = tmp_path / "results.jsonl"
    path.write_text('{"path": "a.png", "score": 1}\n{"path": "a.png", "score": 2}\n')
    journal = ResultJournal(path)
    journal.close()
    assert [row["score"] for row in journal.compact()] == [2]
    assert any(name.endswith(".tmp") for name in synced)  # the new file, before the rename
    assert str(tmp_path) in synced  # and the folder, after it


def test_heatmap_paths_are_distinct_per_file_and_cannot_escape_the_output(
    tmp_path: Path,
) -> None:
    jpg, png = heatmap_path(tmp_path, "a/b.jpg"), heatmap_path(tmp_path, "a/b.png")
    assert jpg == (tmp_path / "heatmaps" / "a" / "b.jpg.png").resolve() and jpg != png
    with pytest.raises(ValueError, match="outside"):
        heatmap_path(tmp_path, "../../etc/passwd")


@pytest.mark.parametrize(
    "case", ["empty_folder", "missing_model", "unknown_product", "unwritable_output"]
)
def test_fatal_problems_give_one_sentence_and_exit_2(
    case: str, store: Path, inspection_folder: Path, tmp_path: Path
) -> None:
    home, folder, out = store, inspection_folder, tmp_path / "out"
    if case == "empty_folder":
        folder = tmp_path / "empty"
        folder.mkdir()
    elif case == "missing_model":
        home = tmp_path / "empty_home"
    elif case != "unknown_product":
        out = tmp_path / "a_file"
        out.write_text("not a folder")
    product = ["--product", "no-such-product"] if case == "unknown_product" else []
    result = run_batch(home, str(folder), "--out", str(out), *product)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert "Traceback" not in result.stderr
    expected = {
        "empty_folder": "holds no files",
        "missing_model": "No product banks in the model store",
        "unknown_product": "Unknown product 'no-such-product'; known products: carpet",
        "unwritable_output": "Cannot write",
    }[case]
    assert expected in errors[0]
    if case != "unwritable_output":  # failed before scoring: no empty folder left behind
        assert not out.exists(), sorted(p.name for p in out.iterdir())


def small_folder(root: Path, count: int = 3, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.fromarray(rng.integers(0, 255, (48, 48, 3), np.uint8)).save(root / f"{i}.png")
    return root


def summary_of(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def test_a_second_job_on_the_same_output_stops_with_one_sentence(
    store: Path, tmp_path: Path
) -> None:
    import fcntl

    folder, out = small_folder(tmp_path / "in"), tmp_path / "out"
    out.mkdir()
    with (out / ".lock").open("a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # as a job still running would
        result = run_batch(store, str(folder), "--out", str(out))
    assert result.returncode == 4, "busy: retryable, unlike 2 (cannot run)"
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Another batch job" in errors[0]
    assert not (out / "results.jsonl").exists()
    assert run_batch(store, str(folder), "--out", str(out)).returncode == 0  # lock released


def test_resume_rescores_changed_files_other_folders_and_other_models(
    store: Path, saved_detector_dir: Path, tmp_path: Path
) -> None:
    folder, out = small_folder(tmp_path / "in"), tmp_path / "out"
    assert run_batch(store, str(folder), "--out", str(out)).returncode == 0
    assert summary_of(out)["scored_this_run"] == 3
    assert run_batch(store, str(folder), "--out", str(out)).returncode == 0
    assert summary_of(out)["scored_this_run"] == 0  # all current: nothing to do
    small_folder(tmp_path / "other", count=1, seed=9)
    shutil.copy(tmp_path / "other" / "0.png", folder / "0.png")  # same name, new content
    assert run_batch(store, str(folder), "--out", str(out)).returncode == 0
    assert summary_of(out)["scored_this_run"] == 1
    elsewhere = small_folder(tmp_path / "elsewhere", seed=5)  # same names, other folder
    assert run_batch(store, str(elsewhere), "--out", str(out)).returncode == 0
    assert summary_of(out)["scored_this_run"] == 3
    exported = run_detector(
        store, "export", str(saved_detector_dir)
    )  # a new version of the same bank
    assert exported.returncode == 0, exported.stderr
    result = run_batch(store, str(elsewhere), "--out", str(out))
    assert result.returncode == 0, result.stderr
    summary = summary_of(out)
    assert summary["scored_this_run"] == 3
    new_tag = exported.stdout.split("saved memory bank model ")[1].split()[0]
    assert [model["bank"] for model in summary["models"]] == [new_tag]
    assert summary["models"][0]["bank"] != "bank-carpet:v1"


def test_evaluate_on_a_resumed_run_covers_every_image(
    store: Path, inspection_folder: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    run_batch(store, str(inspection_folder), "--out", str(out), "--evaluate")
    first = summary_of(out)["evaluation"]["n_images"]
    run_batch(store, str(inspection_folder), "--out", str(out), "--evaluate")
    summary = summary_of(out)
    assert summary["scored_this_run"] == 1  # only the corrupt file is tried again
    assert summary["evaluation"]["n_images"] == first == summary["scored"]


def test_sigterm_exits_3_and_the_same_command_resumes(store: Path, tmp_path: Path) -> None:
    folder, out = small_folder(tmp_path / "in", count=200), tmp_path / "out"
    command = [sys.executable, "-m", "batch", str(folder), "--out", str(out), "--batch-size", "1"]
    process = subprocess.Popen(
        [*command, "--no-progress"],
        cwd=REPO,
        env=service_env(store),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    journal = out / "results.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if journal.exists() and journal.read_bytes().count(b"\n") >= 10:
            break
        time.sleep(0.01)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 3, stderr
    assert "run the same command again" in stderr
    assert run_batch(store, str(folder), "--out", str(out)).returncode == 0
    assert summary_of(out)["scored"] == 200


class FlakyService:
    """An HTTP service that answers /inspect with 503 `failures` times, then a result."""

    def __init__(self, failures: int) -> None:
        import http.server
        import threading

        self.failures, self.requests = failures, 0
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                self.rfile.read(int(self.headers.get("content-length", 0)))
                if self.path == "/model_info":
                    body = {"backbone_model": "b:1", "bank_model": "k:1"}
                elif self.path == "/drift":
                    body = {"reference_profiles": []}
                else:
                    owner.requests += 1
                    if owner.requests <= owner.failures:
                        self.send_response(503)
                        self.send_header("Retry-After", "0")
                        self.end_headers()
                        return
                    body = {
                        "score": 0.5, "threshold": 1.0, "normalized_score": 0.5,
                        "is_anomalous": False, "image_width": 48, "image_height": 48,
                        "models": {"backbone": "b:1", "bank": "k:1"},
                    }  # fmt: skip
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.mark.parametrize("failures", [2, 1000])
def test_url_mode_retries_a_busy_service_then_records_the_file(
    store: Path, tmp_path: Path, failures: int
) -> None:
    service = FlakyService(failures)
    folder, out = small_folder(tmp_path / "in", count=1), tmp_path / "out"
    arguments = ["--url", service.url, "--retries", "3", "--retry-backoff", "0.01"]
    result = run_batch(store, str(folder), "--out", str(out), *arguments)
    service.server.shutdown()
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    (row,) = read_rows(out / "results.jsonl")
    if failures == 2:
        assert row["score"] == 0.5 and service.requests == 3
    else:
        assert row["error"].startswith("HTTP 503") and service.requests == 4


def test_special_files_links_and_an_output_inside_the_input_are_never_scored(
    store: Path, tmp_path: Path
) -> None:
    folder = small_folder(tmp_path / "in", count=1)
    Image.open(folder / "0.png").save(folder / "0.jpg", quality=95)  # same stem as 0.png
    os.mkfifo(folder / "camera.png")  # reading it would block the job forever
    outside = small_folder(tmp_path / "outside", count=1)
    (folder / "link.png").symlink_to(outside / "0.png")
    out = folder / "results"  # inside the input
    for _ in range(2):  # the second run would see the first run's heatmap PNGs
        result = run_batch(store, str(folder), "--out", str(out), "--heatmaps")
        assert result.returncode == 0, result.stderr
    summary = summary_of(out)
    assert summary["images"] == 2
    assert summary["skipped_special_files"] == ["camera.png", "link.png"]
    assert {row["path"] for row in read_rows(out / "results.jsonl")} == {"0.jpg", "0.png"}
    assert (out / "heatmaps" / "0.png.png").exists() and (out / "heatmaps" / "0.jpg.png").exists()


def test_each_shard_writes_its_own_files_and_merge_refuses_mixed_models(
    store: Path, inspection_folder: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    for index in range(2):
        run_batch(store, str(inspection_folder), "--out", str(out), "--shard", f"{index}/2")
    for stem in ("drift_reference", "scores", "summary"):
        assert len(list(out.glob(f"{stem}-shard-*"))) == 2, stem
        assert not list(out.glob(f"{stem}.*")), stem  # nothing shared between shards
    shard = next(out.glob("results-shard-0000-*.jsonl"))
    rows = read_rows(shard)
    shard.write_text("".join(json.dumps({**r, "bank_model": "older:1"}) + "\n" for r in rows))
    refused = run_batch(store, "merge", str(out))
    assert refused.returncode == 2 and "different models" in refused.stderr
    merged = run_batch(store, "merge", str(out), "--allow-mixed-models")
    assert merged.returncode == 0, merged.stderr
    assert len(summary_of(out)["models"]) == 2


def test_the_kubernetes_example_finishes_with_a_corrupt_image(
    store: Path, inspection_folder: Path, tmp_path: Path
) -> None:
    """deploy/k8s/batch-indexed-job.yaml's command, as each pod runs it: exit 0 although one
    image is permanently corrupt (a non-zero exit would make Kubernetes retry forever)."""
    from deploy.kube import load

    (job,) = [
        r for _, r in load([REPO / "deploy/k8s/batch-indexed-job.yaml"]) if r["kind"] == "Job"
    ]
    (container,) = job["spec"]["template"]["spec"]["containers"]
    command = [part.replace("$(THREADS)", "2") for part in container["command"][1:]]
    command = [str(tmp_path / "out") if part == "/data/out" else part for part in command]
    command = [str(inspection_folder) if part == "/data/incoming" else part for part in command]
    assert command[:2] == ["-m", "batch"], command
    for index in range(2):
        shard = {"JOB_COMPLETION_INDEX": str(index), "BATCH_SHARD_COUNT": "2"}
        result = run_main(batch_main, store, *command[2:], **shard)
        assert result.returncode == 0, result.stderr
    merged = run_batch(store, "merge", str(tmp_path / "out"))
    assert merged.returncode == 0 and json.loads(merged.stdout)["failed"] == 1


def test_the_journal_can_fsync_in_groups_for_network_mounts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(fd), real_fsync(fd)))
    journal = ResultJournal(tmp_path / "results.jsonl", fsync_every=3)
    for index in range(7):
        journal.append({"path": f"{index}.png", "score": 0.1})
    assert len(calls) == 2  # after rows 3 and 6, not after every row
    journal.close()
    assert len(calls) == 3  # the last row is made durable at the end
    assert len(read_rows(tmp_path / "results.jsonl")) == 7
