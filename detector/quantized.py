"""A static INT8 backbone for one product (NNCF), served only after it proves itself on
that product's own images (the check: detector.int8_check).

Quantization: NNCF's post-training quantization of the OpenVINO graph of the ONNX export
(`detector.runtimes`), its activation ranges calibrated on the product's defect-free images.
`model_type=TRANSFORMER` is NNCF's guidance for transformers: the MatMuls and the attention
run in int8 while LayerNorm, Softmax, GELU and the residual additions stay in f32, where int8
ranges lose most; `preset=MIXED` (symmetric weights, asymmetric activations) is its default
for them. The graph is made for a batch of one: fixed shapes are about 1.05x faster than the
dynamic-batch graph at 448 px on 2 cores (157 against 164 ms, paired; docs/PERFORMANCE.md,
"INT8 per product"); a batch runs image by image, which costs nothing on a CPU. The export's
constant rotation angles (detector.rope) are what let OpenVINO fuse the position encoding.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from detector.extractor import BackboneSpec, preprocess
from detector.int8_check import (
    GRAPH_FILE,
    INT8_FOLDER,
    INT8_KEY,
    STAMP_FILE,
    Int8Check,
    Int8Unavailable,
    bank_identity,
    graph_sha256,
    has_graph,
    load_check_images,
    save_check_images,
    status,
)

log = logging.getLogger(__name__)
MAX_QUANTIZE_IMAGES = 32  # NNCF's statistics settle well before; more only costs time


# ----- making the graph ------------------------------------------------------------------
def quantize(graph: Path, calibration: np.ndarray, folder: Path, stamp: dict[str, Any]) -> Path:
    """NNCF static int8 of an exported ONNX graph, calibrated on prepared (N, 3, H, W)
    images; written to `folder` as OpenVINO IR with the f32 graph's stamp."""
    try:
        import nncf
        import openvino
    except ImportError:
        raise Int8Unavailable(
            "precision int8 needs NNCF and OpenVINO: `pip install nncf openvino` "
            "(requirements.txt lists both), or fit with precision=f32."
        ) from None
    nncf.set_log_level(logging.ERROR)
    model = openvino.Core().read_model(str(graph))
    model.reshape({0: [1, *calibration.shape[1:]]})
    samples = [np.ascontiguousarray(image[None], dtype=np.float32) for image in calibration]
    quantized = nncf.quantize(
        model,
        nncf.Dataset(samples),
        model_type=nncf.ModelType.TRANSFORMER,
        preset=nncf.QuantizationPreset.MIXED,
        subset_size=len(samples),
    )
    folder.mkdir(parents=True, exist_ok=True)
    openvino.save_model(quantized, str(folder / GRAPH_FILE), compress_to_fp16=False)
    (folder / STAMP_FILE).write_text(json.dumps(stamp) + "\n")
    return folder / GRAPH_FILE


# ----- running it ------------------------------------------------------------------------
class Int8Backbone:
    """A `FeatureExtractor` running a product's int8 graph on the CPU; its spec is the f32
    backbone's (the same weights, rounded), so the product's bank accepts it."""

    precision = "int8"
    hash_context = {"runtime": "openvino", "precision": "int8-static"}  # settings_hash

    def __init__(self, folder: Path, num_threads: int | None = None) -> None:
        import openvino
        import torch

        from detector.runtimes import cache_dir

        stamp = json.loads((folder / STAMP_FILE).read_text())
        self.folder = folder
        self.spec = BackboneSpec.from_dict(stamp["spec"])
        self.random_weights = bool(stamp["random_weights"])
        self.device = torch.device("cpu")
        core = openvino.Core()
        core.set_property({"CACHE_DIR": str(cache_dir() / "openvino")})
        config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY"}
        if num_threads:
            config["INFERENCE_NUM_THREADS"] = int(num_threads)
        compiled = core.compile_model(str(folder / GRAPH_FILE), "CPU", config)
        self._request = compiled.create_infer_request()
        self._output = compiled.output(0)
        self._lock = threading.Lock()  # one inference request: callers take turns

    def prepare(self, image: Image.Image) -> np.ndarray:
        return preprocess(image, self.spec.resolution)

    def embed(self, batch: np.ndarray) -> np.ndarray:
        pixels = np.ascontiguousarray(batch, dtype=np.float32)
        with self._lock:  # the graph takes one image: a batch runs image by image
            grids = [self._request.infer({0: image[None]})[self._output] for image in pixels]
        return np.concatenate(grids).astype(np.float32, copy=False)


def runs_f32(extractor: Any) -> bool:
    """The check's reference: torch or a graph runtime in f32 (not bf16 or another int8)."""
    half = str(getattr(extractor, "dtype", "torch.float32")) != "torch.float32"  # CUDA fp16
    return getattr(extractor, "precision", "f32") == "f32" and not half


# ----- checking it and choosing what a product is served with ----------------------------
def run_check(detector: Any, int8: Any, folder: Path) -> Int8Check:
    """Score the check images stored in `folder` with the detector's own (f32) extractor and
    with `int8`, against the detector's bank and at its threshold."""
    from detector.anomaly_detector import AnomalyDetector

    prepared, sizes = load_check_images(folder)
    rounded = AnomalyDetector(
        int8, detector.bank, detector.calibration, detector.scoring, detector.batch_size
    )
    f32 = [r.score for r in detector.predict_prepared(prepared, sizes, with_maps=False)]
    int8_scores = [r.score for r in rounded.predict_prepared(prepared, sizes, with_maps=False)]
    identity = bank_identity(detector.bank.size, detector.bank.metadata)
    return Int8Check.measure(f32, int8_scores, detector.calibration.threshold, identity)


def product_extractor(
    version_folder: Path,
    document: dict[str, Any],
    bank_size: int,
    shared: Any,
    num_threads: int | None = None,
    product: str = "",
    logger: logging.Logger = log,
) -> tuple[Any, dict[str, Any] | None]:
    """The extractor a product's version is served with, and its int8 status: its own int8
    graph when it asked for int8 and the check holds, else the shared f32 backbone (with one
    log line saying why, when int8 was asked)."""
    state = status(document, bank_size)
    if state is None:
        return shared, None
    if state["served"] == "int8" and shared.device.type != "cpu":
        state = {
            **state,
            "served": "f32",
            "reason": "int8 runs on the CPU; this server runs on " + shared.device.type,
        }
    if state["served"] == "int8":
        int8, problem = _load_checked(version_folder, document, shared, num_threads)
        if problem:
            state = {**state, "served": "f32", "reason": problem}
    if state["served"] != "int8":
        logger.warning(
            "%s asks for int8 but is served in f32: %s", product or version_folder, state["reason"]
        )
        return shared, state
    logger.info("%s: served by its int8 backbone (%s)", product or version_folder, state["check"])
    return int8, state


def _load_checked(
    version_folder: Path, document: dict[str, Any], shared: Any, num_threads: int | None
) -> tuple[Any, str]:
    """(the version's int8 backbone, "") when its graph is the one its check ran on and it
    loads; else (None, why not)."""
    folder = Path(version_folder) / INT8_FOLDER
    if not has_graph(Path(version_folder)):
        return None, f"the int8 graph is missing from {version_folder}"
    try:
        if graph_sha256(folder) != document[INT8_KEY].get("graph_sha256"):
            return None, "the int8 graph in this version is not the one its check ran on"
        int8 = Int8Backbone(folder, num_threads)
        int8.spec.check_compatible(shared.spec)
    except Exception as error:  # a damaged graph or a missing runtime: f32, said once
        return None, f"the int8 graph could not be loaded ({error!r})"
    return int8, ""


def make_int8(
    detector: Any,
    quantize_on: Sequence[Any],
    check_on: Sequence[Any],
    model_dir: Path,
    num_threads: int | None = None,
) -> Int8Check:
    """Quantize the detector's backbone on `quantize_on` (the product's bank images), store
    the graph and the `check_on` images in `model_dir/int8`, run the check, and record it in
    the bank's metadata (saved with the bank): what a fit with `precision=int8` does."""
    import shutil
    import time

    from detector.anomaly_detector import as_image
    from detector.runtimes import exported_before_rope, graph_for
    from detector.tiling import tiling_of

    extractor = detector.extractor
    if tiling_of(extractor) is not None:
        raise Int8Unavailable(
            "precision int8 is not offered for tiled products yet: fit with precision=f32."
        )
    if not runs_f32(extractor):
        raise Int8Unavailable(
            "precision int8 is checked against f32: fit with backbone.precision=f32 "
            f"(this fit runs {extractor.precision})."
        )
    folder = Path(model_dir) / INT8_FOLDER
    shutil.rmtree(folder, ignore_errors=True)
    started = time.perf_counter()
    # Spread over all of them: the first ones may all come from one capture session.
    spread = np.linspace(0, len(quantize_on) - 1, min(len(quantize_on), MAX_QUANTIZE_IMAGES))
    calibration = np.stack(
        [extractor.prepare(as_image(quantize_on[int(i)])) for i in np.unique(spread.round())]
    )
    stamp = {"spec": extractor.spec.to_dict(), "random_weights": extractor.random_weights}
    graph = graph_for(extractor)
    if exported_before_rope(graph):
        log.warning(
            "%s was exported by an older version: from a new export (`python -m detector "
            "export MODEL_DIR`) a DINOv3 int8 backbone runs about 1.1x faster (the same f32 "
            "values; quantized and checked again)",
            graph,
        )
    quantize(graph, calibration, folder, stamp)
    save_check_images(folder, [as_image(image) for image in check_on], extractor.spec.resolution)
    check = run_check(detector, Int8Backbone(folder, num_threads), folder)
    detector.bank.metadata[INT8_KEY] = {
        "check": check.to_dict(),
        "graph_sha256": graph_sha256(folder),
        "quantized_on_images": len(calibration),
        "seconds": round(time.perf_counter() - started, 1),
    }
    if check.accepted:
        log.info("int8 backbone accepted: %s", check.summary())
    else:
        log.warning("int8 backbone refused, the product is served in f32: %s", check.reason)
    return check


def recheck(detector: Any, version_folder: Path, num_threads: int | None = None) -> None:
    """Run the check again for a detector made from the version in `version_folder` (new
    rows: added images, a session), when that product serves int8; the result goes into
    the detector's metadata, so the new version states it. `detector` must run in f32."""
    section = detector.bank.metadata.get(INT8_KEY)
    folder = Path(version_folder) / INT8_FOLDER
    if not section or not has_graph(Path(version_folder)):
        return
    if not runs_f32(detector.extractor):  # no reference: stale, served in f32 until rerun
        log.warning("int8 check not run again: the server's backbone is not f32")
        return
    try:
        check = run_check(detector, Int8Backbone(folder, num_threads), folder)
    except Exception as error:  # the change goes on; its version is served in f32 (stale)
        log.warning("int8 check could not run again (%r): served in f32 until it does", error)
        return
    detector.bank.metadata[INT8_KEY] = {**section, "check": check.to_dict()}
    if not check.accepted:
        log.warning("int8 check refused after the change, served in f32: %s", check.reason)
