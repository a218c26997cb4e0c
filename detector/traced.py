"""The torch runtime without `transformers` at start: a TorchScript trace of the backbone.

A runner that loads DINOv3 through `transformers` spends about 5 s importing it (it pulls in
`torch.distributed`, dynamo and more) before it reads a single weight; loading a trace of the
same forward needs only torch (0.2 s for ViT-S/16). `python -m detector export` stores the
trace beside the weights and the ONNX graph, and keeps it only if it computes *exactly*
what the eager model computes (bit-equal patch tokens), so the store's consumers (the
service, the batch job, replay) give the same scores whether or not they use it.
`torch.export`'s saved programs would be the newer format, but loading one took 7 s here
(docs/PERFORMANCE.md, "Cold start"); torch is pinned (requirements.txt), where
`torch.jit.load` still works and only warns that it is deprecated.

The trace is used for stored backbones on the CPU in float32; on CUDA, or in half
precision, the eager model is loaded as before.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from detector.extractor import BackboneSpec, find_stored, preprocess, stored_name

if TYPE_CHECKING:
    import torch

    from detector.dino import DinoBackbone

log = logging.getLogger(__name__)
TRACES_FOLDER = "graphs"  # beside the ONNX graphs of the same weights
STAMP_FILE = "dino_inspect_backbone.json"  # inside the trace: the spec it computes
# Batches the export compares eager and traced on: several sizes and repeated calls, since
# the TorchScript executor may change a graph after its first runs.
CHECK_BATCHES = (1, 2, 1)


def find_trace(folder: Path, resolution: int, layers: Sequence[int]) -> Path | None:
    """A stored trace in `folder` for this resolution and layer set."""
    return find_stored(folder / TRACES_FOLDER, resolution, layers, ".pt")


def _load(path: Path) -> tuple[Any, dict[str, Any]]:
    import torch

    stamp = {STAMP_FILE: ""}
    with warnings.catch_warnings():  # "deprecated": see the module docstring
        warnings.filterwarnings("ignore", category=DeprecationWarning, module="torch.jit")
        program = torch.jit.load(str(path), map_location="cpu", _extra_files=stamp)
    if not stamp[STAMP_FILE]:
        raise ValueError(f"{path} was not written by `python -m detector export`")
    return program.eval(), json.loads(stamp[STAMP_FILE])


def trace_backbone(backbone: DinoBackbone, folder: Path) -> Path | None:
    """Trace `backbone.patch_tokens` to `folder/<resolution, layers, fingerprint>.pt`, or
    store nothing (and say why) when the trace does not reproduce the eager tokens bit for
    bit: the torch runtime then loads the eager model, as before."""
    import torch

    if backbone.dtype != torch.float32 or backbone.device.type != "cpu":
        raise ValueError("trace the backbone in float32 on the CPU")
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / stored_name(backbone.spec, ".pt")
    temporary = target.with_suffix(".pt.tmp")
    size = backbone.resolution
    stamp = {"spec": backbone.spec.to_dict(), "random_weights": backbone.random_weights}
    generator = torch.Generator().manual_seed(0)
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", module="torch.jit")
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        program = torch.jit.trace(
            backbone.as_module(), torch.zeros(1, 3, size, size), check_trace=False
        )
        torch.jit.save(program, str(temporary), _extra_files={STAMP_FILE: json.dumps(stamp)})
        reloaded, _ = _load(temporary)
        for batch in CHECK_BATCHES:
            pixels = torch.randn(batch, 3, size, size, generator=generator)
            if not torch.equal(run_trace(reloaded, pixels), backbone.patch_tokens(pixels)):
                temporary.unlink()
                log.warning(
                    "the TorchScript trace of %s does not reproduce its tokens exactly on "
                    "this machine: not stored; the torch runtime loads the eager model",
                    backbone.name,
                )
                return None
    os.replace(temporary, target)
    log.info("traced the backbone to %s", target)
    return target


def run_trace(program: Any, pixels: torch.Tensor) -> torch.Tensor:
    """The trace's forward exactly as traced: without the executor's graph optimisations,
    so it runs the eager model's operations and nothing else."""
    import torch

    with torch.jit.optimized_execution(False):
        return program(pixels)


class TracedBackbone:
    """A `FeatureExtractor` that runs a stored trace on the CPU; its spec is the trace's."""

    def __init__(self, path: Path, num_threads: int | None = None) -> None:
        import torch

        if num_threads:
            torch.set_num_threads(int(num_threads))
        self.program, stamp = _load(path)
        self.path = path
        self.spec = BackboneSpec.from_dict(stamp["spec"])
        self.random_weights = bool(stamp["random_weights"])
        if self.random_weights:
            log.warning("trace %s has RANDOM weights: anomaly scores are not meaningful", path)
        self.device = torch.device("cpu")
        log.info("torch runtime: the TorchScript trace stored with the backbone (%s)", path.name)

    def prepare(self, image: Image.Image) -> np.ndarray:
        return preprocess(image, self.spec.resolution)

    def embed(self, batch: np.ndarray) -> np.ndarray:
        import torch

        # No lock: a module's forward does not change it, and a fit's thread embeds beside
        # the scoring one (detector/serving/fit_jobs.py), as with the eager model.
        with torch.inference_mode():
            pixels = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))
            return run_trace(self.program, pixels).numpy()
