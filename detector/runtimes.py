"""The backbone on a CPU inference runtime: an ONNX graph of the exact torch computation.

On CPU the ViT forward is nearly all of an inspection's cost, so the ceiling moves only with
a faster runtime. `export_graph` traces `DinoBackbone.patch_tokens` (what torch's `embed`
runs) into ONNX and writes the backbone's spec, weights fingerprint included, into the
graph's own metadata; `GraphBackbone` runs that graph with OpenVINO or ONNX Runtime behind
the same `FeatureExtractor` interface, with the same preprocessing. Because the graph
carries its fingerprint, `backbone.extractor_for` refuses a graph of other weights exactly as it
refuses another checkpoint. docs/PERFORMANCE.md has the measurements behind the choices.

Graphs live beside the weights they came from: `python -m detector export` stores one in the
backbone model (`graphs/`), and the service only uses stored graphs (nothing is exported or
compiled from scratch on the request path). Commands given a checkpoint without a graph
export one once into the user cache (`~/.cache/dino-inspect/graphs`).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from detector.dino import DinoBackbone
from detector.errors import UserError
from detector.extractor import (
    BackboneSpec,
    find_stored,
    preprocess,
    resolve_device,
    stored_name,
)
from detector.rope import Rotation, rotation_over_every_token

log = logging.getLogger(__name__)
RUNTIMES = ("torch", "openvino", "onnxruntime")
GRAPH_RUNTIMES = RUNTIMES[1:]
PRECISIONS = ("f32", "bf16", "int8")
# What each graph runtime offers: bf16 needs a CPU with bf16 instructions (AVX-512 BF16 or
# AMX); int8 is ONNX Runtime's dynamic quantization of the stored f32 graph.
RUNTIME_PRECISIONS = {
    "torch": ("f32",),
    "openvino": ("f32", "bf16"),
    "onnxruntime": ("f32", "int8"),
}
GRAPHS_FOLDER = "graphs"
SPEC_METADATA_KEY = "dino_inspect_backbone"
OPSET = 18  # the opset the DINOv3 export was checked with (tests/test_runtimes.py)
# 2: the position encoding rotates every token by constant angles (detector.rope); graphs
# without the number rotate as transformers does: the same values, slower.
EXPORT_FORMAT = 2
# Which Python package each runtime needs, for the "not installed" sentence.
PACKAGES = {"openvino": "openvino", "onnxruntime": "onnxruntime"}


class RuntimeUnavailableError(UserError):
    """The chosen runtime is not installed or cannot run the chosen precision."""


class GraphMissingError(UserError):
    """No exported graph for this backbone where the service may only use stored ones."""


def cache_dir() -> Path:
    """Per-user cache for graphs exported by commands and OpenVINO's compiled blobs."""
    base = os.environ.get("DINO_INSPECT_CACHE") or os.environ.get("XDG_CACHE_HOME")
    return (Path(base) if base else Path.home() / ".cache") / "dino-inspect"


def check_runtime(runtime: str, precision: str = "f32") -> None:
    """Refuse an unknown or uninstalled runtime, or a precision it does not offer."""
    if runtime not in RUNTIMES:
        raise RuntimeUnavailableError(
            f"Unknown runtime {runtime!r}: choose one of {', '.join(RUNTIMES)}."
        )
    if precision not in PRECISIONS:
        raise RuntimeUnavailableError(
            f"Unknown precision {precision!r}: choose one of {', '.join(PRECISIONS)}."
        )
    if precision not in RUNTIME_PRECISIONS[runtime]:
        offered = {name: ", ".join(p) for name, p in RUNTIME_PRECISIONS.items()}
        raise RuntimeUnavailableError(
            f"Runtime {runtime} does not run precision {precision} (torch: {offered['torch']}, "
            f"half precision on CUDA through half_precision; openvino: {offered['openvino']}; "
            f"onnxruntime: {offered['onnxruntime']})."
        )
    if runtime == "torch":
        return
    try:
        __import__(PACKAGES[runtime])
    except ImportError:
        raise RuntimeUnavailableError(
            f"Runtime {runtime!r} is not installed: `pip install {PACKAGES[runtime]}` "
            "(requirements.txt lists it), or choose runtime torch."
        ) from None


# ----- graphs ----------------------------------------------------------------------------
def export_graph(backbone: DinoBackbone, folder: Path, rotate_every_token: bool = True) -> Path:
    """Trace `backbone.patch_tokens` to `folder/<resolution, layers, fingerprint>.onnx`.

    Batch size is dynamic, the resolution fixed (the bank's), and the position encoding's
    angles constants that rotate every token (`detector.rope`: the same values, fewer
    operations; `rotate_every_token=False` keeps transformers' rotation, the runtime
    benchmark's "before"). The spec and the random-weights flag go into the graph's
    metadata, so the file says which weights it computes.
    """
    import torch

    if backbone.dtype != torch.float32 or backbone.device.type != "cpu":
        raise ValueError("export the graph from a float32 backbone on the CPU")
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / stored_name(backbone.spec, ".onnx")
    temporary = target.with_suffix(".onnx.tmp")
    example = torch.zeros(1, 3, backbone.resolution, backbone.resolution)
    rotation = (
        rotation_over_every_token(backbone.model, backbone.resolution, backbone.num_prefix_tokens)
        if rotate_every_token
        else contextlib.nullcontext(Rotation())
    )
    with torch.inference_mode(), rotation as report:
        torch.onnx.export(
            backbone.as_module(),
            (example,),
            str(temporary),
            input_names=["pixels"],
            output_names=["patches"],
            opset_version=OPSET,
            dynamo=False,
            dynamic_axes={"pixels": {0: "batch"}, "patches": {0: "batch"}},
        )
    stamp = {
        "spec": backbone.spec.to_dict(),
        "random_weights": backbone.random_weights,
        "export_format": EXPORT_FORMAT if rotate_every_token else 1,
    }
    _stamp(temporary, stamp)
    os.replace(temporary, target)
    log.info("exported the backbone graph to %s", target)
    if report.swapped and not report.calls:
        log.warning(
            "this transformers version no longer calls the rotation detector.rope replaces: "
            "the graph rotates as transformers does (the same values, int8 about 1.1x slower)"
        )
    return target


def _stamp(path: Path, stamp: dict[str, Any]) -> None:
    import onnx

    graph = onnx.load(str(path))
    onnx.helper.set_model_props(graph, {SPEC_METADATA_KEY: json.dumps(stamp)})
    onnx.save(graph, str(path))


def quantized_graph(graph: Path) -> Path:
    """ONNX Runtime's dynamic int8 quantization of a stored graph, made once into the cache
    (about a second for ViT-S/16) and stamped with the same spec: same weights, rounded."""
    target = cache_dir() / GRAPHS_FOLDER / f"{graph.stem}-int8.onnx"
    # Made again when the graph was exported after it (a newer export of the same name).
    if not target.exists() or target.stat().st_mtime_ns < graph.stat().st_mtime_ns:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        target.parent.mkdir(parents=True, exist_ok=True)
        temporary = target.with_suffix(".onnx.tmp")
        quantize_dynamic(str(graph), str(temporary), weight_type=QuantType.QInt8)
        _stamp(temporary, graph_stamp(graph))
        os.replace(temporary, target)
    return target


def graph_stamp(path: Path) -> dict[str, Any]:
    """The spec, random-weights flag and export format `export_graph` wrote into a graph."""
    status = Path(path).stat()
    return json.loads(_stamp_text(str(path), status.st_mtime_ns, status.st_size))


@functools.lru_cache(maxsize=32)
def _stamp_text(path: str, modified_ns: int, size: int) -> str:
    """Read once per version of a file: reading the stamp parses the whole graph (87 MB
    for ViT-S/16, over a GB for ViT-L), and a fit asks several times."""
    import onnx

    graph = onnx.load(path, load_external_data=False)
    props = {prop.key: prop.value for prop in graph.metadata_props}
    if SPEC_METADATA_KEY not in props:
        raise GraphMissingError(
            f"{path} was not written by `python -m detector export`: it does not say which "
            "backbone weights it computes, so it is not used."
        )
    return props[SPEC_METADATA_KEY]


def exported_before_rope(graph: Path) -> bool:
    """Whether a graph predates the rotation over every token: it computes the same; for
    DINOv3 more slowly (int8 about 1.1x); `python -m detector export` again replaces it."""
    return graph_stamp(graph).get("export_format", 1) < EXPORT_FORMAT


def find_graph(folder: Path, resolution: int, layers: Sequence[int]) -> Path | None:
    """A stored graph in `folder` for this resolution and layer set."""
    return find_stored(folder / GRAPHS_FOLDER, resolution, layers, ".onnx")


def locate_graph(
    source: str, layers: Sequence[int], resolution: int, export_missing: bool, **torch_options: Any
) -> Path:
    """The graph for a checkpoint: stored beside it, in the cache, or (commands only)
    exported now from the torch weights."""
    folder = Path(source)
    if folder.is_dir() and (stored := find_graph(folder, resolution, layers)):
        return stored
    if not export_missing:
        raise GraphMissingError(
            f"The backbone at {source} has no exported graph for resolution {resolution} and "
            f"layers {list(layers)}: run `python -m detector export <model_dir>` again (it "
            "stores the graph with the backbone), or serve with INSPECT_RUNTIME=torch."
        )
    backbone = DinoBackbone(source, layers=layers, resolution=resolution, **torch_options)
    cached, current = _in_cache(backbone.spec)
    return cached if current else export_graph(backbone, cached.parent)


def _in_cache(spec: BackboneSpec) -> tuple[Path, bool]:
    """The cache's path for `spec`'s graph, and whether it holds one of the current format."""
    cached = cache_dir() / GRAPHS_FOLDER / stored_name(spec, ".onnx")
    return cached, cached.exists() and not exported_before_rope(cached)


def graph_for(extractor: Any) -> Path:
    """The f32 ONNX graph of the weights an extractor runs: its own, or the one stored or
    cached for its checkpoint, else exported now (once, into the cache)."""
    if isinstance(extractor, GraphBackbone) and extractor.precision == "f32":
        return extractor.graph
    spec = extractor.spec
    folder = Path(spec.source)
    if folder.is_dir() and (stored := find_graph(folder, spec.resolution, spec.layers)):
        return stored
    cached, current = _in_cache(spec)
    if current:
        return cached
    if isinstance(extractor, DinoBackbone) and extractor.device.type == "cpu":
        return export_graph(extractor, cached.parent)
    return locate_graph(spec.source, spec.layers, spec.resolution, True, device="cpu")


# ----- sessions ----------------------------------------------------------------------------
Session = Callable[[np.ndarray], np.ndarray]


def _openvino_session(path: Path, precision: str, num_threads: int | None) -> Session:
    import openvino

    core = openvino.Core()
    # Compiled blobs are cached, so a restart compiles in a fraction of the first time.
    core.set_property({"CACHE_DIR": str(cache_dir() / "openvino")})
    capabilities = core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    if precision == "bf16" and "BF16" not in capabilities:
        # Asked anyway, OpenVINO emulates bf16 on AVX-512 without it: 29x slower than f32
        # (docs/PERFORMANCE.md, "INT8 per product"). f32 it is, and the log says so.
        log.warning(
            "this CPU has no bf16 instructions (OpenVINO offers %s): running f32", capabilities
        )
        precision = "f32"
    config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": precision}
    if num_threads:
        config["INFERENCE_NUM_THREADS"] = int(num_threads)
    compiled = core.compile_model(str(path), "CPU", config)
    request = compiled.create_infer_request()
    output = compiled.output(0)
    return lambda batch: request.infer({0: batch})[output]


def _onnxruntime_session(path: Path, precision: str, num_threads: int | None) -> Session:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = int(num_threads or 0)  # 0: ONNX Runtime's default
    options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda batch: session.run(None, {"pixels": batch})[0]


SESSIONS: dict[str, Callable[[Path, str, int | None], Session]] = {
    "openvino": _openvino_session,
    "onnxruntime": _onnxruntime_session,
}


class GraphBackbone:
    """A `FeatureExtractor` that runs an exported graph; its spec is the graph's own."""

    def __init__(
        self, graph: Path, runtime: str, precision: str = "f32", num_threads: int | None = None
    ) -> None:
        check_runtime(runtime, precision)
        stamp = graph_stamp(graph)
        if precision == "int8":
            graph = quantized_graph(graph)
        self.graph = graph
        self.runtime, self.precision = runtime, precision
        self.spec = BackboneSpec.from_dict(stamp["spec"])
        self.random_weights = bool(stamp["random_weights"])
        if self.random_weights:
            log.warning("graph %s has RANDOM weights: anomaly scores are not meaningful", graph)
        import torch

        self.device = torch.device("cpu")
        self._run = SESSIONS[runtime](graph, precision, num_threads)
        self._lock = threading.Lock()  # one inference request: callers take turns

    def prepare(self, image: Image.Image) -> np.ndarray:
        return preprocess(image, self.spec.resolution)

    def embed(self, batch: np.ndarray) -> np.ndarray:
        pixels = np.ascontiguousarray(batch, dtype=np.float32)
        with self._lock:
            return np.asarray(self._run(pixels), dtype=np.float32)


def build_graph_backbone(
    source: str,
    runtime: str,
    *,
    precision: str = "f32",
    layers: Sequence[int] = (-1,),
    resolution: int = 448,
    device: str = "auto",
    num_threads: int | None = None,
    export_missing: bool = True,
    half_precision: bool = False,
) -> GraphBackbone:
    """`build_extractor` for the graph runtimes."""
    check_runtime(runtime, precision)
    if resolve_device(device).type != "cpu":
        log.warning("runtime %s runs on the CPU; device %s is not used", runtime, device)
    if half_precision:
        log.warning("half_precision is for torch on CUDA; use precision=bf16 with openvino")
    graph = locate_graph(
        source, layers, resolution, export_missing, device="cpu", num_threads=num_threads
    )
    return GraphBackbone(graph, runtime, precision, num_threads)
