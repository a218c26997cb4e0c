"""The one factory for feature extractors: a hub id or a `save_pretrained` folder, run by
torch (`detector.dino`) or, on CPU, by a graph runtime (`detector.runtimes`).
`extractor_for` makes the one a stored bank needs and checks it against the bank's spec.
"""

from __future__ import annotations

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
    """
    from detector.runtimes import build_graph_backbone, check_runtime

    if runtime == "torch":
        from detector.dino import DinoBackbone

        check_runtime(runtime, precision)
        options.pop("export_missing", None)
        return DinoBackbone(source, **options)
    return build_graph_backbone(source, runtime, precision=precision, **options)


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
