"""DINOv3's rotary position encoding over every token, for the exported graph.

transformers rotates only the patch tokens: in each layer it splits the queries and keys
into the prefix (class and register tokens) and the patches, rotates the patches by angles
it computes from the image's shape, and concatenates the two again. Exported like that,
each layer carries a dozen small operations OpenVINO cannot fuse. Rotating every token, the
prefix by the identity (cos 1, sin 0), gives the same values (q·1 + r·0 = q; only a -0.0 in
a prefix row comes out +0.0); with the angles as constants of the graph, OpenVINO fuses each
rotation into one RoPE operation, and the int8 backbone runs about 1.1x faster at 448 px
(1.02-1.25x across runs; docs/PERFORMANCE.md, "INT8 per product"). Only the export uses
it: the torch runtimes run transformers' own code.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

# Two exports at once must not restore each other's swap; reentrant, so an export inside
# an export (another model) does not wait for itself.
_SWAPPING = threading.RLock()


@dataclass
class Rotation:
    """What a `rotation_over_every_token` block did: whether the model has DINOv3's rotary
    encoding (so was swapped), and how often the whole-sequence rotation then ran. Swapped
    but never run means transformers no longer calls the function this module replaces."""

    swapped: bool = False
    calls: int = 0


def _fixed_angles(rope: torch.nn.Module, resolution: int, prefix: int) -> Any:
    """A module standing in for the model's rope: the angles of `resolution` with identity
    rows for the `prefix` tokens, computed now. They are its buffers, so the export records
    them once, as the graph's initializers, not as a constant at each of their uses; while
    the stand-in is in place the model's state_dict shows them, which only the export reads."""
    import torch

    with torch.no_grad():
        cos, sin = rope(torch.zeros(1, 3, resolution, resolution))
    padding = (0, 0, prefix, 0)  # rows before the patches' rows

    class FixedAngles(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("cos", torch.nn.functional.pad(cos, padding, value=1.0))
            self.register_buffer("sin", torch.nn.functional.pad(sin, padding, value=0.0))

        def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            if tuple(pixel_values.shape[-2:]) != (resolution, resolution):  # not the export's
                return rope(pixel_values)
            return self.cos.to(pixel_values.dtype), self.sin.to(pixel_values.dtype)

    return FixedAngles()


@contextmanager
def rotation_over_every_token(
    model: torch.nn.Module, resolution: int, prefix: int
) -> Iterator[Rotation]:
    """While it lasts, `model` (a DINOv3 ViT from transformers) rotates every token with
    constant angles for square images of `resolution`; other models are left as they are.

    Another thread's forward of the same model meanwhile still computes the same values:
    the angles of either rope meet either rotation function correctly (transformers' own
    function reads full tables as zero prefix tokens)."""
    from transformers.models.dinov3_vit import modeling_dinov3_vit as dinov3

    report = Rotation()
    with _SWAPPING:
        rope = getattr(model, "rope_embeddings", None)
        if not isinstance(rope, dinov3.DINOv3ViTRopePositionEmbedding):
            yield report
            return
        transformers_rotation = dinov3.apply_rotary_pos_emb

        def rotate_every_token(
            query: torch.Tensor, key: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, **kw: Any
        ) -> tuple[torch.Tensor, torch.Tensor]:
            if cos.shape[-2] != query.shape[-2]:  # the patches' angles only: transformers' way
                return transformers_rotation(query, key, cos, sin, **kw)
            report.calls += 1
            rotate = dinov3.rotate_half
            return query * cos + rotate(query) * sin, key * cos + rotate(key) * sin

        report.swapped = True
        try:
            model.rope_embeddings = _fixed_angles(rope, resolution, prefix)
            dinov3.apply_rotary_pos_emb = rotate_every_token
            yield report
        finally:
            dinov3.apply_rotary_pos_emb = transformers_rotation
            model.rope_embeddings = rope
