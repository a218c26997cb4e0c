"""The one factory for feature extractors: a hub id or a `save_pretrained` folder, run by
torch (`detector.dino`) or, on CPU, by a graph runtime (`detector.runtimes`).
`extractor_for` makes the one a stored bank needs and checks it against the bank's spec.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from detector.extractor import BackboneSpec, FeatureExtractor


def build_extractor(
    source: str, *, runtime: str = "torch", precision: str = "f32", **options: Any
) -> FeatureExtractor:
    """The one factory for feature extractors: a hub id or a `save_pretrained` folder, run
    by torch or, on CPU, by a graph runtime (detector.runtimes).

    `options`: layers, resolution, device, half_precision, num_threads; and for a graph
    runtime `export_missing` (False in the service: only stored graphs are used).
    `stored_trace`: torch on the CPU in float32 runs the TorchScript trace `export` stored
    beside the weights, when there is one (detector.traced: the same tokens, bit for bit,
    without importing transformers); the store's consumers ask for it.
    """
    from detector.runtimes import build_graph_backbone, check_runtime

    stored_trace = options.pop("stored_trace", False)
    if runtime == "torch":
        from detector.dino import DinoBackbone

        check_runtime(runtime, precision)
        options.pop("export_missing", None)
        if stored_trace and (trace := _stored_trace(source, **options)):
            from detector.traced import TracedBackbone

            return TracedBackbone(trace, options.get("num_threads"))
        return DinoBackbone(source, **options)
    return build_graph_backbone(source, runtime, precision=precision, **options)


def _stored_trace(
    source: str,
    *,
    layers: Sequence[int] = (-1,),
    resolution: int = 448,
    device: str = "auto",
    half_precision: bool = False,
    **_: Any,
) -> Path | None:
    from detector.extractor import resolve_device
    from detector.traced import find_trace

    if half_precision or resolve_device(device).type != "cpu" or not Path(source).is_dir():
        return None
    return find_trace(Path(source), resolution, layers)


def extractor_for(
    spec: BackboneSpec, source: str | Path | None = None, **options: Any
) -> FeatureExtractor:
    """The extractor `spec` describes, loaded from `source` (default: where the bank was
    fitted from) and checked against the spec before it is used."""
    extractor = build_extractor(
        str(source or spec.source), layers=spec.layers, resolution=spec.resolution, **options
    )
    spec.check_compatible(extractor.spec)
    return extractor
