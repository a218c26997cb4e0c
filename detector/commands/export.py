"""Save a fitted detector's backbone and memory bank as BentoML models.

    python -m detector export models/carpet [--metrics outputs/evaluate/.../metrics.json]
                              [--backbone PATH_OR_HUB_ID] [--bank-name inspection-bank]
                              [--no-graph]

`bentoml models list` then shows both; `bentoml serve` picks up the `:latest` of each.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from detector.backbone import BackboneSpec
from detector.errors import exits_on_user_error
from detector.memory_bank import MemoryBank
from detector.serving.model_store import BACKBONE_MODEL, BANK_MODEL, save_backbone, save_bank


@exits_on_user_error
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path, help="folder written by `detector fit`")
    parser.add_argument("--metrics", type=Path, help="metrics.json from `detector evaluate`")
    parser.add_argument("--backbone", help="checkpoint to store (default: the one in bank.json)")
    parser.add_argument("--backbone-name", default=BACKBONE_MODEL)
    parser.add_argument("--bank-name", default=BANK_MODEL)
    parser.add_argument(
        "--no-graph",
        action="store_true",
        help="do not store the ONNX graph the CPU runtimes (openvino, onnxruntime) need",
    )
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    spec = BackboneSpec.from_dict(MemoryBank.load(args.model_dir).metadata["extractor"])
    metrics = json.loads(args.metrics.read_text()) if args.metrics else None
    # Built and checked against the bank before anything is written to the store.
    loaded = spec.build(args.backbone, device="cpu")
    backbone = save_backbone(loaded, args.backbone_name, with_graph=not args.no_graph)
    bank = save_bank(args.model_dir, backbone, metrics, args.bank_name)
    print(f"saved backbone model {backbone.tag}\nsaved memory bank model {bank.tag}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
