"""DINOv3 (or DINOv2) patch features through `transformers`: the default extractor.

Loads a hub id or a `save_pretrained` folder (explaining in one sentence why not when it
cannot), fingerprints the weights for the bank's spec, and returns normalised patch tokens
of the chosen layers.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from detector.extractor import (
    DEFAULT_BACKBONE,
    RANDOM_WEIGHTS_MARKER,
    BackboneSpec,
    BackboneUnavailableError,
    preprocess,
    resolve_device,
)

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


def _unavailable_message(name_or_path: str, error: Exception) -> str:
    text = str(error).lower()
    looks_like_path = Path(name_or_path).expanduser().is_absolute() or name_or_path.startswith(".")
    if looks_like_path or Path(name_or_path).exists():
        return (
            f"Backbone folder '{name_or_path}' has no loadable checkpoint: point backbone.name "
            "to a folder written by save_pretrained (config.json + weights)."
        )
    if "gated" in text or "401" in text or "403" in text or "access" in text:
        return (
            f"Backbone '{name_or_path}' is a gated model: accept its licence on huggingface.co, "
            "set HF_TOKEN, or point backbone.name to a local folder with the weights."
        )
    return (
        f"Backbone '{name_or_path}' could not be loaded (hub unreachable or weights missing): "
        "download it where the hub is reachable and point backbone.name to that local folder, "
        "or accept its licence and set HF_TOKEN."
    )


# How long the hub may take to answer one question before it counts as unreachable: the
# hub client's own retries with backoff took about 30 s to give up (measured, unreachable hub).
HUB_PROBE_TIMEOUT_S = 2.0


@functools.lru_cache(maxsize=8)
def hub_reachable(repo_id: str) -> bool:
    """Whether the Hugging Face hub answers at all (any HTTP status, a 401 for a gated model
    included) to one request within a couple of seconds. `HF_HUB_OFFLINE=1` skips it."""
    import httpx
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    try:
        httpx.head(f"{constants.ENDPOINT}/api/models/{repo_id}", timeout=HUB_PROBE_TIMEOUT_S)
    except httpx.HTTPError as error:  # timeouts, refused connections, DNS: no hub from here
        log.info("the hub did not answer (%s)", type(error).__name__)
        return False
    return True


def _in_local_cache(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)


def load_pretrained(name_or_path: str) -> torch.nn.Module:
    """Load a transformers vision backbone from a hub id or a local folder, or explain why not.

    A hub id is tried on the hub only when the hub answers a quick probe; otherwise only the
    local cache is read, so an unreachable hub costs seconds, not a retry storm.
    """
    from transformers import AutoModel

    is_hub_id = not Path(name_or_path).exists()
    offline = is_hub_id and not hub_reachable(name_or_path)
    if offline and not _in_local_cache(name_or_path):
        error = OSError("the hub is unreachable and the weights are not in the local cache")
        raise BackboneUnavailableError(_unavailable_message(name_or_path, error)) from None
    try:
        return AutoModel.from_pretrained(name_or_path, local_files_only=offline)
    except (OSError, ValueError) as error:
        raise BackboneUnavailableError(_unavailable_message(name_or_path, error)) from None
    except Exception as error:  # hub client errors are not all OSErrors
        if type(error).__module__.startswith(("huggingface_hub", "requests", "httpx")):
            raise BackboneUnavailableError(_unavailable_message(name_or_path, error)) from None
        raise


def weights_fingerprint(model: torch.nn.Module) -> str:
    """A short id of the architecture and weights, the same wherever the folder is copied.

    Hashing the config plus the first and last parameter tensors is cheap at start-up and
    tells two checkpoints apart, which the name or path (a hub id, a model-store folder) cannot.
    """
    config = model.config.to_dict()
    config.pop("_name_or_path", None)
    config.pop("transformers_version", None)
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    parameters = list(model.parameters())
    for tensor in (parameters[0], parameters[-1]):
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


class DinoBackbone:
    """A DINO ViT from `transformers` that returns normalised patch tokens of chosen layers.

    Layers are block indices (1..L, negative from the end); each selected block output goes
    through the model's final LayerNorm, as DINOv2's `get_intermediate_layers(norm=True)` does,
    so layer -1 equals `last_hidden_state`. Several layers are concatenated along D.
    """

    def __init__(
        self,
        name: str = DEFAULT_BACKBONE,
        *,
        layers: Sequence[int] = (-1,),
        resolution: int = 448,
        device: str = "auto",
        half_precision: bool = False,
        num_threads: int | None = None,
    ) -> None:
        import torch

        if num_threads:
            torch.set_num_threads(int(num_threads))
        # A local folder is recorded absolute, so a bank fitted here loads from any directory.
        self.name = str(Path(name).resolve()) if Path(name).exists() else str(name)
        self.device = resolve_device(device)
        self.model = load_pretrained(self.name).eval().to(self.device)
        fingerprint = weights_fingerprint(self.model)  # before any cast to half precision
        self.dtype = torch.float32
        if half_precision and self.device.type == "cuda":
            self.dtype = torch.float16
            self.model = self.model.half()
        elif half_precision:
            log.warning("half_precision is ignored on %s: it only pays off on CUDA", self.device)
        config = self.model.config
        patch = config.patch_size
        self.patch_size = int(patch[0] if isinstance(patch, (list, tuple)) else patch)
        self.num_prefix_tokens = 1 + int(getattr(config, "num_register_tokens", 0) or 0)
        self.num_blocks = int(config.num_hidden_layers)
        self.layers = tuple(int(layer) for layer in layers)
        for layer in self.layers:
            if layer == 0 or abs(layer) > self.num_blocks:
                raise ValueError(f"layer {layer} is outside 1..{self.num_blocks} (or -1..-N)")
        self.resolution = max(self.patch_size, resolution // self.patch_size * self.patch_size)
        self.final_norm = getattr(self.model, "norm", None) or self.model.layernorm
        self.random_weights = self._has_random_weights()
        if self.random_weights:
            log.warning(
                "Backbone '%s' has RANDOM weights: anomaly scores are not meaningful. "
                "Use real DINOv3 weights for inspection.",
                self.name,
            )
        self.spec = BackboneSpec(
            source=self.name,
            layers=self.layers,
            resolution=self.resolution,
            patch_size=self.patch_size,
            feature_dim=int(config.hidden_size) * len(self.layers),
            fingerprint=fingerprint,
        )

    def _has_random_weights(self) -> bool:
        folder = Path(self.name)
        return folder.is_dir() and (folder / RANDOM_WEIGHTS_MARKER).exists()

    def prepare(self, image: Image.Image) -> np.ndarray:
        return preprocess(image, self.resolution)

    def patch_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, h, w, D) normalised patch tokens of the chosen layers.

        The computation `embed` runs and `detector.runtimes.export_graph` exports, so a graph
        runtime computes exactly what torch does.
        """
        import torch

        outputs = self.model(pixel_values=pixels, output_hidden_states=True)
        grid = self.resolution // self.patch_size
        selected = []
        for layer in self.layers:
            hidden = outputs.hidden_states[layer if layer > 0 else self.num_blocks + 1 + layer]
            tokens = self.final_norm(hidden)[:, self.num_prefix_tokens :, :]
            selected.append(tokens.reshape(-1, grid, grid, tokens.shape[-1]))
        return torch.cat(selected, dim=-1) if len(selected) > 1 else selected[0]

    def as_module(self) -> torch.nn.Module:
        """`patch_tokens` as a module whose weights are registered: what the ONNX export
        (detector.runtimes) and the TorchScript trace (detector.traced) both record."""
        import torch

        backbone = self

        class PatchTokens(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.model = backbone.model  # registered, so the weights are recorded

            def forward(self, pixels: torch.Tensor) -> torch.Tensor:
                return backbone.patch_tokens(pixels)

        return PatchTokens().eval()

    def embed(self, batch: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            pixels = torch.from_numpy(np.ascontiguousarray(batch)).to(self.device, self.dtype)
            return self.patch_tokens(pixels).float().cpu().numpy()
