"""Save a fitted detector's backbone and memory bank as BentoML models.

    python -m detector export models/carpet [--metrics outputs/evaluate/.../metrics.json]
                              [--backbone PATH_OR_HUB_ID] [--product NAME]
                              [--no-graph]

`bentoml models list` then shows both; `bentoml serve` picks up the `:latest` of each.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import bentoml

from detector.backbone import extractor_for
from detector.banks.models import BACKBONE_MODEL, find_backbone, save_backbone, save_bank
from detector.errors import exits_on_user_error
from detector.extractor import BackboneSpec
from detector.memory_bank import MemoryBank


def step(message: str) -> None:
    """A progress line on stderr: exporting takes seconds to a minute (the graph trace)."""
    print(f"export: {message}", file=sys.stderr, flush=True)


def export_models(
    model_dir: Path,
    *,
    metrics: Path | None = None,
    backbone_source: str | None = None,
    backbone_name: str = BACKBONE_MODEL,
    product: str | None = None,
    with_graph: bool = True,
    force: bool = False,
) -> tuple[bentoml.Model, bentoml.Model]:
    """The bank into the store as a new version of its product, with its backbone: a stored
    backbone of the same weights is reused (every product shares one), else the backbone
    is built, checked against the bank and stored first."""
    spec = BackboneSpec.from_dict(MemoryBank.load(model_dir).metadata["extractor"])
    scores = json.loads(metrics.read_text()) if metrics else None
    backbone = None if backbone_source else find_backbone(spec, backbone_name, with_graph)
    if backbone is not None:
        step(f"reusing the stored backbone {backbone.tag} (same weights)")
    else:
        step(f"loading the backbone {backbone_source or spec.source}")
        loaded = extractor_for(spec, backbone_source, device="cpu")
        step(
            "saving the backbone with its TorchScript trace"
            + (" and its ONNX graph" if with_graph else "")
        )
        backbone = save_backbone(loaded, backbone_name, with_graph=with_graph)
    step("saving the memory bank")
    bank = save_bank(model_dir, backbone, scores, product, force=force)
    return backbone, bank


@exits_on_user_error
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path, help="folder written by `detector fit`")
    parser.add_argument("--metrics", type=Path, help="metrics.json from `detector evaluate`")
    parser.add_argument("--backbone", help="checkpoint to store (default: the one in bank.json)")
    parser.add_argument("--backbone-name", default=BACKBONE_MODEL)
    parser.add_argument(
        "--product", help="product to add this bank to (default: the one `fit` recorded)"
    )
    parser.add_argument(
        "--no-graph",
        action="store_true",
        help="do not store the ONNX graph the CPU runtimes (openvino, onnxruntime) need",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="export even over a live bank that later changes made, or beside products "
        "served with another backbone",
    )
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    backbone, bank = export_models(
        args.model_dir,
        metrics=args.metrics,
        backbone_source=args.backbone,
        backbone_name=args.backbone_name,
        product=args.product,
        with_graph=not args.no_graph,
        force=args.force,
    )
    print(f"saved backbone model {backbone.tag}\nsaved memory bank model {bank.tag}")
    print("next: bentoml serve   (web page at http://localhost:3000/ui/)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
