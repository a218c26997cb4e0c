"""Write a random-initialised DINOv3 checkpoint that loads through `from_pretrained`.

Hub weights cannot be downloaded everywhere (CI, air-gapped plants), so tests and the demo
use these folders through the very same loading code as the real model. The `vits16` preset
has the released ViT-S/16 shape, so benchmarks with it time what production would run.

    python -m detector random-backbone DIR [--preset tiny|vits16] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from detector.extractor import RANDOM_WEIGHTS_MARKER

PRESETS: dict[str, dict[str, int]] = {
    # Small enough that a test fits in seconds; patch 8 exercises a non-16 patch size.
    "tiny": dict(
        patch_size=8,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=3,
        num_register_tokens=4,
        image_size=64,
    ),
    # facebook/dinov3-vits16-pretrain-lvd1689m's shape, random weights.
    "vits16": dict(
        patch_size=16,
        hidden_size=384,
        intermediate_size=1536,
        num_hidden_layers=12,
        num_attention_heads=6,
        num_register_tokens=4,
        image_size=224,
    ),
}


def make_backbone(directory: str | Path, preset: str = "tiny", seed: int = 0) -> Path:
    """Save a random DINOv3ViTModel of the given preset shape and mark it as random."""
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    torch.manual_seed(seed)
    config = DINOv3ViTConfig(**PRESETS[preset])
    model = DINOv3ViTModel(config).eval()
    directory = Path(directory)
    model.save_pretrained(directory)
    marker = {"preset": preset, "seed": seed, "note": "random weights: scores are not meaningful"}
    (directory / RANDOM_WEIGHTS_MARKER).write_text(json.dumps(marker) + "\n")
    return directory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    path = make_backbone(args.directory, args.preset, args.seed)
    print(f"wrote random {args.preset} DINOv3 checkpoint to {path}")


if __name__ == "__main__":
    main()
