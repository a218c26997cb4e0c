"""Model-store export, refusal to start, API key, and `bentoml build` of the bundle."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import yaml

from detector.commands.random_backbone import make_backbone
from devtools.http_client import http_client
from devtools.in_process import bentoml_home, run_detector
from devtools.local_server import (
    REPO,
    bentoml_serve,
    serve_until_exit,
    service_env,
)


@pytest.fixture(scope="module")
def store(saved_detector_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp("bentoml_home")
    result = run_detector(home, "export", str(saved_detector_dir))
    assert result.returncode == 0, result.stderr
    assert "saved backbone model dino-backbone:" in result.stdout
    return home


@pytest.fixture(scope="module")
def other_backbone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_backbone(tmp_path_factory.mktemp("other") / "tiny-seed-1", "tiny", seed=1)


def test_export_refuses_a_backbone_the_bank_was_not_fitted_with(
    saved_detector_dir: Path, other_backbone: Path, tmp_path: Path
) -> None:
    result = run_detector(
        tmp_path, "export", str(saved_detector_dir), "--backbone", str(other_backbone)
    )
    assert result.returncode == 2
    assert "fingerprint" in result.stderr and "refit the bank" in result.stderr
    assert not (tmp_path / "models").exists() or not any((tmp_path / "models").iterdir())


def test_serve_refuses_a_mismatched_pair_with_one_sentence(
    store: Path, other_backbone: Path
) -> None:
    from detector.banks.models import save_backbone
    from detector.dino import DinoBackbone

    with bentoml_home(store):
        save_backbone(DinoBackbone(str(other_backbone), resolution=128), "other-backbone")
    code, output = serve_until_exit(store, 120, INSPECT_BACKBONE_MODEL="other-backbone:latest")
    assert code not in (None, 0), output[-2000:]
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "cannot be used with" in errors[0], output[-2000:]


def test_serve_without_models_says_what_to_do(tmp_path: Path) -> None:
    code, output = serve_until_exit(tmp_path, 120)
    assert code not in (None, 0)
    assert "python -m detector export" in output and "No product banks in the model store" in output


def test_api_key_protects_scoring_but_not_health_or_metrics(
    store: Path, tmp_path: Path, synthetic_root: Path
) -> None:
    image = next((synthetic_root / "carpet" / "test" / "good").glob("*.png")).read_bytes()
    files = {"image": ("a.png", image, "image/png")}
    key = "s3cret-line-key-for-tests"
    log = tmp_path / "serve.log"
    with bentoml_serve(store, log, INSPECT_API_KEY=f" {key}\n") as url:  # stripped
        assert http_client.post(f"{url}/inspect", files=files, timeout=60).status_code == 401
        wrong = http_client.post(
            f"{url}/inspect", files=files, headers={"X-API-Key": "nope"}, timeout=60
        )
        assert wrong.status_code == 401 and wrong.json()["reason"] == "unauthorised"
        right = http_client.post(
            f"{url}/inspect", files=files, headers={"X-API-Key": key}, timeout=60
        )
        assert right.status_code == 200 and "score" in right.json()
        bearer = http_client.post(
            f"{url}/heatmap", files=files, headers={"Authorization": f"Bearer {key}"}, timeout=60
        )
        assert bearer.status_code == 200
        records = http_client.get(f"{url}/records", headers={"X-API-Key": key}, timeout=10)
        assert records.status_code == 403, "a line key reads no records"
        # Nothing but the API listens on TCP: BentoML's supervisor (which holds every key
        # in its workers' environment and starts programs) has private Unix sockets.
        port = int(url.rsplit(":", 1)[1])
        (root,) = [
            p
            for p in psutil.process_iter(["cmdline"])
            if f"--port {port}" in " ".join(p.info["cmdline"] or [])
        ]
        pids = {root.pid, *(child.pid for child in root.children(recursive=True))}
        listening = {
            c.laddr.port
            for c in psutil.net_connections("tcp")
            if c.status == psutil.CONN_LISTEN and c.pid in pids
        }
        assert listening == {port}
        assert http_client.get(f"{url}/readyz", timeout=10).status_code == 200
        assert http_client.get(f"{url}/metrics", timeout=10).status_code == 200
    text = log.read_text()
    (posture,) = [line for line in text.splitlines() if "inspection access:" in line]
    assert "keys required (line 1, reviewer 0, admin 0)" in posture
    assert "no key may do reviewer/admin work" in posture and key not in text


def test_a_server_on_the_network_refuses_to_start_without_keys_or_host_names(
    store: Path,
) -> None:
    code, output = serve_until_exit(store, 120, host="0.0.0.0")
    assert code == 2 and "would listen on 0.0.0.0 with no API key" in output, output[-2000:]
    assert "INSPECT_ANONYMOUS_SCORING" in output
    admin = "network-admin-key-0123"
    code, output = serve_until_exit(store, 120, host="0.0.0.0", INSPECT_ADMIN_KEY=admin)
    assert code == 2 and "INSPECT_ALLOWED_HOSTS" in output and admin not in output


def test_bentoml_build_packs_both_models_and_a_dockerfile(store: Path, tmp_path: Path) -> None:
    env = service_env(store)
    shutil.rmtree(store / "records", ignore_errors=True)  # a server of this module made them
    build = subprocess.run(
        [sys.executable, "-m", "bentoml", "build", "--output", "tag"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    tag = build.stdout.strip().splitlines()[-1].removeprefix("__tag__:")
    assert tag.startswith("dino-inspection:")
    bento_dir = store / "bentos" / "dino-inspection" / tag.split(":")[1]
    info = yaml.safe_load((bento_dir / "bento.yaml").read_text())
    runner = next(s for s in info["services"] if s["name"] == "inspection_runner")
    names = sorted(model["tag"].split(":")[0] for model in runner["models"])
    assert names == ["bank-carpet", "dino-backbone"]
    dockerfile = (bento_dir / "env" / "docker" / "Dockerfile").read_text()
    assert "FROM python:3.11" in dockerfile and "libgomp1" in dockerfile
    assert "requirements.txt" in dockerfile and "EXPOSE 3000" in dockerfile
    assert (bento_dir / "src" / "detector" / "serving" / "static" / "index.html").exists()
    migrations = bento_dir / "src" / "detector" / "records" / "migrations"
    assert (migrations / "env.py").exists() and list((migrations / "versions").glob("0001_*.py"))
    assert not (store / "records").exists(), "building a Bento touches no records database"

    archive = tmp_path / "bundle.bento"
    subprocess.run(
        [sys.executable, "-m", "bentoml", "export", tag, str(archive)],
        env=env,
        check=True,
        capture_output=True,
        timeout=300,
    )
    with tarfile.open(archive) as bundle:
        members = bundle.getnames()
    for name in ("dino-backbone", "bank-carpet"):
        assert any(m.startswith(f"./models/{name}/") and m.endswith("model.yaml") for m in members)
    assert any(
        m.startswith("./models/dino-backbone/") and m.endswith("/model.safetensors")
        for m in members
    )
    assert any(
        m.startswith("./models/bank-carpet/") and m.endswith("/index.faiss") for m in members
    )
    # The CPU runtimes' graph travels with the backbone, and the runtimes with the image.
    assert any(m.startswith("./models/dino-backbone/") and "/graphs/" in m for m in members)
    requirements = (bento_dir / "env" / "python" / "requirements.txt").read_text()
    assert all(name in requirements for name in ("openvino", "onnxruntime", "onnx"))
    assert info["labels"]["project"] == "dino-inspection"


def test_export_guards_the_store_and_serve_refuses_only_the_product_it_cannot_serve(
    saved_detector_dir: Path, other_backbone: Path, synthetic_dataset: Any, tmp_path: Path
) -> None:
    """Issue 28: following evaluate's hint turned a reviewed live bank back into the
    original fit, and a product fitted with another backbone stopped every product."""
    home = tmp_path / "home"
    assert run_detector(home, "export", str(saved_detector_dir)).returncode == 0
    again = run_detector(
        home, "export", str(saved_detector_dir)
    )  # a fit over a fit: a normal update
    assert again.returncode == 0, again.stderr
    moved = run_detector(home, "set-threshold", "carpet", "--target", "0.2")
    assert moved.returncode == 0, moved.stderr
    refused = run_detector(home, "export", str(saved_detector_dir))
    assert refused.returncode == 2
    assert "v3" in refused.stderr and "--force" in refused.stderr, refused.stderr
    forced = run_detector(home, "export", str(saved_detector_dir), "--force")
    assert forced.returncode == 0 and "bank-carpet:v4" in forced.stdout, forced.stderr

    # A product fitted with other weights, as moving from the demo to real weights does.
    from detector.dino import DinoBackbone
    from detector.fitting import fit_detector
    from detector.memory_bank import BankConfig

    images = sorted(synthetic_dataset.train_paths())[:4]
    backbone = DinoBackbone(str(other_backbone), resolution=64, device="cpu")
    widget = fit_detector(
        backbone, images[:3], images[3:], bank_config=BankConfig(coreset_ratio=0.5), progress=False
    )
    widget.bank.metadata["category"] = "widget"
    other = widget.save(tmp_path / "widget")
    mixed = run_detector(home, "export", str(other), "--product", "widget")
    assert mixed.returncode == 2 and "'carpet'" in mixed.stderr, mixed.stderr
    assert "INSPECT_PRODUCTS" in mixed.stderr
    # Forced in anyway: the service serves carpet and refuses widget by name.
    assert (
        run_detector(home, "export", str(other), "--product", "widget", "--force").returncode == 0
    )
    admin = {"X-API-Key": "admin-key-for-the-mixed-store"}
    log = tmp_path / "serve.log"
    with bentoml_serve(home, log, INSPECT_ADMIN_KEY=admin["X-API-Key"]) as url:
        image = sorted(synthetic_dataset.train_paths())[0].read_bytes()

        def inspect(product: str) -> httpx.Response:
            files, form = {"image": ("part.png", image)}, {"product": product}
            return http_client.post(
                f"{url}/inspect", files=files, data=form, headers=admin, timeout=60
            )

        assert inspect("carpet").status_code == 200
        refused = inspect("widget")
        assert refused.status_code == 503 and refused.json()["reason"] == "bank_incompatible"
        assert "Refit widget" in refused.json()["error"]
        listing = {e["name"]: e for e in http_client.get(f"{url}/products", headers=admin).json()}
        assert listing["widget"]["reason"] == "bank_incompatible" and "version" in listing["carpet"]
        metrics = http_client.get(f"{url}/metrics", timeout=30).text
        assert 'inspection_bank_unavailable{product="widget"} 1.0' in metrics
        assert "not served: widget" in log.read_text()
