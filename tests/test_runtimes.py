"""The backbone on OpenVINO and ONNX Runtime: same scores as torch, and clear refusals."""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from batch.__main__ import main as batch_main
from detector.anomaly_detector import AnomalyDetector
from detector.commands.random_backbone import make_backbone
from detector.data.mvtec import MVTecCategory
from detector.dino import DinoBackbone
from detector.rope import rotation_over_every_token
from detector.runtimes import (
    GRAPHS_FOLDER,
    GraphBackbone,
    _stamp,
    export_graph,
    exported_before_rope,
    graph_for,
    graph_stamp,
)
from devtools.http_client import http_client
from devtools.in_process import bentoml_home, run_main
from devtools.local_server import (
    REPO,
    bentoml_serve,
    serve_until_exit,
    service_env,
)

F32_TOLERANCE = 1e-4


@pytest.fixture(scope="module", autouse=True)
def private_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Graphs exported by commands go to a cache of this module's own."""
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DINO_INSPECT_CACHE", str(cache))
        yield


@pytest.fixture(scope="module")
def test_paths(synthetic_dataset: MVTecCategory) -> list[Path]:
    return [sample.path for sample in synthetic_dataset.test_samples()]


@pytest.fixture(scope="module")
def torch_results(fitted_detector: AnomalyDetector, test_paths: list[Path]):
    return fitted_detector.predict(test_paths)


@pytest.mark.parametrize("runtime", ["openvino", "onnxruntime"])
def test_f32_runtimes_score_like_torch(
    runtime: str, saved_detector_dir: Path, test_paths: list[Path], torch_results
) -> None:
    detector = AnomalyDetector.load(saved_detector_dir, runtime=runtime, device="cpu")
    assert isinstance(detector.extractor, GraphBackbone)
    assert detector.extractor.spec == detector.bank_spec  # the graph says whose weights it has
    for got, want in zip(detector.predict(test_paths), torch_results, strict=True):
        assert got.score == pytest.approx(want.score, abs=F32_TOLERANCE)
        assert got.is_anomalous == want.is_anomalous
        np.testing.assert_allclose(got.anomaly_map, want.anomaly_map, atol=F32_TOLERANCE)


def test_int8_is_opt_in_and_moves_scores_only_a_little(
    saved_detector_dir: Path, test_paths: list[Path], torch_results
) -> None:
    detector = AnomalyDetector.load(
        saved_detector_dir, runtime="onnxruntime", precision="int8", device="cpu"
    )
    assert detector.extractor.graph.name.endswith("-int8.onnx")
    results = detector.predict(test_paths, with_maps=False)
    differences = [
        abs(got.score - want.score) for got, want in zip(results, torch_results, strict=True)
    ]
    assert 0 < max(differences) < 0.05  # quantized for real, and still the same scale


def test_bf16_on_a_cpu_without_it_runs_f32_and_says_so(
    saved_detector_dir: Path, test_paths: list[Path], caplog: pytest.LogCaptureFixture
) -> None:
    """OpenVINO emulates bf16 on AVX-512 CPUs without it, 29x slower than f32: never asked."""
    import openvino

    if "BF16" in openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        pytest.skip("this CPU has bf16 instructions: bf16 runs for real here")
    with caplog.at_level(logging.WARNING, logger="detector.runtimes"):
        bf16 = AnomalyDetector.load(
            saved_detector_dir, runtime="openvino", precision="bf16", device="cpu"
        )
    assert any(
        "no bf16 instructions" in r.message and "running f32" in r.message for r in caplog.records
    )
    f32 = AnomalyDetector.load(saved_detector_dir, runtime="openvino", device="cpu")
    images = test_paths[:3]
    got = [r.score for r in bf16.predict(images, with_maps=False)]
    assert got == [r.score for r in f32.predict(images, with_maps=False)]  # f32 itself


def test_a_precision_a_runtime_does_not_offer_is_one_sentence(saved_detector_dir: Path) -> None:
    from detector.runtimes import RuntimeUnavailableError

    with pytest.raises(RuntimeUnavailableError, match="does not run precision int8"):
        AnomalyDetector.load(saved_detector_dir, runtime="openvino", precision="int8")
    with pytest.raises(RuntimeUnavailableError, match="Unknown runtime"):
        AnomalyDetector.load(saved_detector_dir, runtime="tensorrt")


def stored_graph(home: Path) -> Path:
    (graph,) = (home / "models" / "dino-backbone").glob(f"*/{GRAPHS_FOLDER}/*.onnx")
    return graph


def test_export_stores_a_graph_stamped_with_the_banks_backbone(
    store: Path, fitted_detector: AnomalyDetector
) -> None:
    stamp = graph_stamp(stored_graph(store))
    assert stamp["spec"]["fingerprint"] == fitted_detector.extractor.spec.fingerprint
    assert stamp["random_weights"] is True


def test_the_graph_rotates_every_token_by_constant_angles_with_the_same_values(
    tiny_backbone: DinoBackbone, tmp_path: Path
) -> None:
    """transformers splits q and k in every layer to rotate the patches only; the export
    rotates every token (the prefix by the identity) by constant angles, which OpenVINO
    fuses: the tokens must not change, and the model must be left as it was."""
    import torch
    from transformers.models.dinov3_vit import modeling_dinov3_vit as dinov3

    model, size = tiny_backbone.model, tiny_backbone.resolution
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(2, 3, size, size, generator=generator)
    other_size = torch.randn(1, 3, size + 2 * tiny_backbone.patch_size, size, generator=generator)
    prefix = tiny_backbone.num_prefix_tokens
    with torch.inference_mode():
        before = tiny_backbone.patch_tokens(pixels), model(pixel_values=other_size)[0]
        rope, rotation = model.rope_embeddings, dinov3.apply_rotary_pos_emb
        with rotation_over_every_token(model, size, prefix) as report:
            assert dinov3.apply_rotary_pos_emb is not rotation  # swapped for real
            during = tiny_backbone.patch_tokens(pixels), model(pixel_values=other_size)[0]
            # Another thread may meet the full tables with transformers' own function.
            cos, sin = model.rope_embeddings(pixels)
            query, key = torch.randn(2, 2, 3, cos.shape[0], cos.shape[1], generator=generator)
            ours = dinov3.apply_rotary_pos_emb(query, key, cos, sin)
            theirs = rotation(query, key, cos, sin)
    assert report.swapped and report.calls > 0
    assert torch.equal(during[0], before[0])  # the export's resolution: every token rotated
    assert torch.equal(during[1], before[1])  # another: transformers' own way
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))
    assert model.rope_embeddings is rope and dinov3.apply_rotary_pos_emb is rotation
    with pytest.raises(RuntimeError), rotation_over_every_token(model, size, prefix):
        raise RuntimeError("an export that fails")
    assert model.rope_embeddings is rope and dinov3.apply_rotary_pos_emb is rotation

    tokens = prefix + (size // tiny_backbone.patch_size) ** 2
    head = model.config.hidden_size // model.config.num_attention_heads
    _, split = angle_tables_and_operations(
        export_graph(tiny_backbone, tmp_path / "split", rotate_every_token=False), tokens, head
    )
    tables, every = angle_tables_and_operations(
        export_graph(tiny_backbone, tmp_path / "every"), tokens, head
    )
    assert split["Cos"] and split["Sin"] and not every["Cos"] and not every["Sin"]  # constants
    # Each layer's q and k no longer cut into prefix and patches and joined again.
    assert every["Slice"] < split["Slice"] and every["Concat"] < split["Concat"], (split, every)
    assert tables == 2  # cos and sin, once each: not recorded again at each of their uses


def angle_tables_and_operations(path: Path, tokens: int, head: int) -> tuple[int, Counter]:
    """How many (tokens x head) constant tables a graph holds, and its operations' counts."""
    import onnx

    graph = onnx.load(str(path)).graph
    tables = [t for t in graph.initializer if list(t.dims) == [tokens, head]]
    tables += [
        a.t
        for n in graph.node
        if n.op_type == "Constant"
        for a in n.attribute
        if a.name == "value" and list(a.t.dims)[-2:] == [tokens, head]
    ]
    return len(tables), Counter(node.op_type for node in graph.node)


def test_a_cached_graph_from_before_the_rotation_is_exported_again(
    tiny_backbone: DinoBackbone,
) -> None:
    """Graphs in the user cache are ours to replace: one exported before the rotation over
    every token (no format in its stamp) is exported again when a command needs it."""
    import onnx

    cached = graph_for(tiny_backbone)  # exported now into this module's cache, or found there
    old = export_graph(tiny_backbone, cached.parent, rotate_every_token=False)
    stamp = graph_stamp(old)
    del stamp["export_format"]  # as graphs stamped before the format existed
    _stamp(old, stamp)
    assert old == cached and exported_before_rope(old)
    again = graph_for(tiny_backbone)
    assert again == cached and not exported_before_rope(again)
    assert "Cos" not in {node.op_type for node in onnx.load(str(again)).graph.node}


def test_an_export_stores_the_backbone_again_when_its_graph_is_of_an_older_format(
    tiny_backbone: DinoBackbone, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`python -m detector export` reuses a stored backbone of the same weights, unless its
    graph is of an older export format: exporting again must give the newer graph."""
    import detector.runtimes as runtimes
    from detector.banks.models import find_backbone, save_backbone

    with bentoml_home(tmp_path / "home"):
        stored_model = save_backbone(tiny_backbone, "dino-backbone", with_graph=True)
        assert find_backbone(tiny_backbone.spec).tag == stored_model.tag
        monkeypatch.setattr(runtimes, "EXPORT_FORMAT", runtimes.EXPORT_FORMAT + 1)
        assert find_backbone(tiny_backbone.spec) is None


def test_served_inspect_and_batch_job_on_openvino_score_like_torch(
    store: Path, test_paths: list[Path], torch_results, tmp_path: Path
) -> None:
    with bentoml_serve(store, tmp_path / "serve.log", INSPECT_RUNTIME="openvino") as url:
        info = http_client.post(f"{url}/model_info", timeout=30).json()
        assert info["runtime"] == "openvino" and info["precision"] == "f32"
        for path, want in zip(test_paths, torch_results, strict=True):
            files = {"image": (path.name, path.read_bytes(), "image/png")}
            got = http_client.post(f"{url}/inspect", files=files, timeout=60).json()
            assert got["score"] == pytest.approx(want.score, abs=F32_TOLERANCE)
    folder = test_paths[0].parent.parent  # the test split
    out = tmp_path / "batch"
    command = [str(folder), "--out", str(out), "--runtime", "openvino", "--no-progress"]
    result = run_main(batch_main, store, *command)
    assert result.returncode == 0, result.stderr
    from batch.results import read_rows

    scores = {row["path"]: row["score"] for row in read_rows(out / "results.jsonl")}
    for path, want in zip(test_paths, torch_results, strict=True):
        assert scores[path.relative_to(folder).as_posix()] == pytest.approx(
            want.score, abs=F32_TOLERANCE
        )


def run(home: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args],
        cwd=REPO,
        env=service_env(home, **env),
        capture_output=True,
        text=True,
        timeout=300,
    )


def one_error_line(output: str) -> str:
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in output, output[-3000:]
    return errors[0]


@pytest.fixture(scope="module")
def without_openvino(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A PYTHONPATH on which `import openvino` fails, as where it is not installed."""
    folder = tmp_path_factory.mktemp("no_openvino")
    (folder / "openvino").mkdir()
    (folder / "openvino" / "__init__.py").write_text("raise ImportError('not installed')\n")
    return f"{folder}:{REPO}"


def test_an_uninstalled_runtime_stops_commands_and_serve_with_one_sentence(
    store: Path, test_paths: list[Path], without_openvino: str, tmp_path: Path
) -> None:
    folder = str(test_paths[0].parent)
    batch = run(
        store,
        *("-m", "batch", folder, "--out", str(tmp_path / "o"), "--runtime", "openvino"),
        PYTHONPATH=without_openvino,
    )
    assert batch.returncode == 2
    assert "is not installed" in one_error_line(batch.stderr)
    code, output = serve_until_exit(
        store, 120, INSPECT_RUNTIME="openvino", PYTHONPATH=without_openvino
    )
    assert code not in (None, 0)
    assert "`pip install openvino`" in one_error_line(output)


def test_a_graph_of_other_weights_or_none_stops_serve_with_one_sentence(
    store_copy: Callable[[Path], Path], tmp_path: Path
) -> None:
    home = store_copy(tmp_path / "home")
    graph = stored_graph(home)
    other_dir = make_backbone(tmp_path / "other", "tiny", seed=1)
    resolution = graph_stamp(graph)["spec"]["resolution"]
    other = export_graph(DinoBackbone(str(other_dir), resolution=resolution), tmp_path / "g")
    shutil.copy(other, graph)  # another checkpoint's graph under this backbone's name
    code, output = serve_until_exit(home, 120, INSPECT_RUNTIME="onnxruntime")
    assert code not in (None, 0)
    assert "fingerprint" in one_error_line(output)
    graph.unlink()
    code, output = serve_until_exit(home, 120, INSPECT_RUNTIME="onnxruntime")
    assert code not in (None, 0)
    assert "no exported graph" in one_error_line(output)


def stored_backbone(home: Path) -> Path:
    (folder,) = (home / "models" / "dino-backbone").glob("*/model.yaml")
    return folder.parent


def test_the_stored_trace_gives_the_eager_tokens_bit_for_bit_without_transformers(
    store: Path, tiny_backbone: DinoBackbone, tmp_path: Path
) -> None:
    from detector.backbone import build_extractor
    from detector.traced import TracedBackbone

    folder = stored_backbone(store)
    assert "trace: torchscript" in (folder / "model.yaml").read_text()
    batch = np.stack([np.random.default_rng(seed).normal(size=(3, 128, 128)) for seed in (1, 2)])
    np.save(tmp_path / "batch.npy", batch.astype(np.float32))
    # What the runner does, in a process of its own: the store's extractor, then one batch.
    script = (
        "import sys, numpy as np, bentoml\n"
        "from detector.banks.models import load_extractor\n"
        "backbone = bentoml.models.get('dino-backbone:latest')\n"
        "bank = bentoml.models.get('bank-carpet:latest')\n"
        "extractor = load_extractor(backbone, {'carpet': bank}, device='cpu')\n"
        f"batch = np.load('{tmp_path / 'batch.npy'}')\n"
        f"np.save('{tmp_path / 'tokens.npy'}', extractor.embed(batch))\n"
        "print(type(extractor).__name__, 'transformers' in sys.modules)\n"
    )
    result = run(store, "-c", script)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["TracedBackbone", "False"]
    eager = tiny_backbone.embed(np.load(tmp_path / "batch.npy"))
    assert np.array_equal(np.load(tmp_path / "tokens.npy"), eager)
    # Half precision (CUDA's option) and commands given the folder itself load the eager model.
    options = {"resolution": 128, "device": "cpu"}
    traced = build_extractor(str(folder), stored_trace=True, **options)
    assert isinstance(traced, TracedBackbone) and traced.spec == tiny_backbone.spec
    assert isinstance(build_extractor(str(folder), **options), DinoBackbone)
    half = build_extractor(str(folder), stored_trace=True, half_precision=True, **options)
    assert isinstance(half, DinoBackbone)


def test_a_trace_that_does_not_reproduce_the_tokens_is_not_stored(
    tiny_backbone: DinoBackbone, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from detector import traced

    exact = traced.run_trace
    monkeypatch.setattr(
        traced, "run_trace", lambda program, pixels: exact(program, pixels) * 1.0001
    )
    assert traced.trace_backbone(tiny_backbone, tmp_path) is None
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(traced, "run_trace", exact)
    stored = traced.trace_backbone(tiny_backbone, tmp_path)
    assert stored is not None and [p.name for p in tmp_path.iterdir()] == [stored.name]
