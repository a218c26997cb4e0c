"""DINOv3 (or DINOv2) patch features through `transformers`, with Pillow/numpy preprocessing.

The rest of the detector only sees `FeatureExtractor`: images in, a (B, h, w, D) float32
patch grid out, plus a `BackboneSpec` that the memory bank stores so a bank is never served
with a backbone it was not fitted with. `build_extractor` is the one place an extractor is
made; `BackboneSpec.build` makes the one a stored bank needs and checks it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from PIL import Image

from detector.errors import UserError

if TYPE_CHECKING:  # torch is imported where a backbone runs: what only reads a bank's
    import torch  # metadata (the API process, `bentoml serve` itself) starts without it

log = logging.getLogger(__name__)

DEFAULT_BACKBONE = "facebook/dinov3-vits16-pretrain-lvd1689m"
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
# (pixel / 255 - mean) / std as one multiply-add per channel, on (3, 1, 1)-shaped constants.
_PIXEL_SCALE = (1.0 / (255.0 * IMAGENET_STD)).astype(np.float32)[:, None, None]
_PIXEL_OFFSET = (-IMAGENET_MEAN / IMAGENET_STD).astype(np.float32)[:, None, None]
RANDOM_WEIGHTS_MARKER = "RANDOM_WEIGHTS"


class BackboneUnavailableError(UserError):
    """The backbone weights cannot be loaded; the message says what the user should do."""


class IncompatibleBankError(UserError):
    """The memory bank was fitted with another backbone, resolution or layer set."""


@dataclass(frozen=True)
class BackboneSpec:
    """What a bank records about the backbone that made its features.

    Two specs are compatible when they would give the same features for the same image:
    same weights (fingerprint), layers, input resolution, patch size and feature size. Where
    the weights were loaded from (`source`) may differ: a model-store copy of a hub model is
    the same backbone.
    """

    source: str  # hub id or folder the weights were loaded from
    layers: tuple[int, ...]
    resolution: int
    patch_size: int
    feature_dim: int
    fingerprint: str | None = None  # None only in banks saved before fingerprints existed

    MUST_MATCH = ("fingerprint", "layers", "resolution", "patch_size", "feature_dim")

    def to_dict(self) -> dict[str, Any]:
        """JSON form; the source is stored as "backbone", as banks have always stored it."""
        document = asdict(self)
        document["backbone"] = document.pop("source")
        document["layers"] = list(self.layers)
        return document

    @classmethod
    def from_dict(cls, document: dict[str, Any]) -> BackboneSpec:
        return cls(
            source=str(document.get("backbone") or document.get("source")),
            layers=tuple(int(layer) for layer in document.get("layers", (-1,))),
            resolution=int(document["resolution"]),
            patch_size=int(document["patch_size"]),
            feature_dim=int(document["feature_dim"]),
            fingerprint=document.get("fingerprint"),
        )

    def check_compatible(self, other: BackboneSpec) -> None:
        """Raise `IncompatibleBankError` unless `other` gives the features this spec's bank
        holds; a field that one side does not record (an old bank) is not compared."""
        differences = [
            f"{key} {getattr(self, key)!r} vs {getattr(other, key)!r}"
            for key in self.MUST_MATCH
            if None not in (getattr(self, key), getattr(other, key))
            and getattr(self, key) != getattr(other, key)
        ]
        if differences:
            raise IncompatibleBankError(
                f"The memory bank was fitted with backbone '{self.source}' and cannot be used "
                f"with '{other.source}' ({'; '.join(differences)}): refit the bank with this "
                "backbone or serve it with the backbone it was fitted with."
            )

    def build(self, source: str | Path | None = None, **options: Any) -> FeatureExtractor:
        """The extractor this spec describes, loaded from `source` (default: where the bank
        was fitted from) and checked against the spec before it is used."""
        extractor = build_extractor(
            str(source or self.source), layers=self.layers, resolution=self.resolution, **options
        )
        self.check_compatible(extractor.spec)
        return extractor


class FeatureExtractor(Protocol):
    """What the detector needs from a backbone; any model that yields patch grids fits."""

    spec: BackboneSpec
    device: torch.device
    random_weights: bool  # scores mean nothing; every surface that shows a score says so

    def prepare(self, image: Image.Image) -> np.ndarray:
        """One RGB image -> a (3, H, W) float32 array ready for `embed`."""

    def embed(self, batch: np.ndarray) -> np.ndarray:
        """A (B, 3, H, W) batch -> (B, h, w, D) float32 patch features."""


def build_extractor(
    source: str, *, runtime: str = "torch", precision: str = "f32", **options: Any
) -> FeatureExtractor:
    """The one factory for feature extractors: a hub id or a `save_pretrained` folder, run
    by torch or, on CPU, by a graph runtime (detector.runtimes).

    `options`: layers, resolution, device, half_precision, num_threads; and for a graph
    runtime `export_missing` (False in the service: only stored graphs are used).
    """
    if runtime == "torch":
        from detector.runtimes import check_runtime

        check_runtime(runtime, precision)
        options.pop("export_missing", None)
        return DinoBackbone(source, **options)
    from detector.runtimes import build_graph_backbone

    return build_graph_backbone(source, runtime, precision=precision, **options)


def preprocess(image: Image.Image, resolution: int) -> np.ndarray:
    """Resize to a square `resolution` and normalise with ImageNet statistics: (3, H, W).

    Squashing instead of cropping keeps every pixel of the part in view, so the anomaly map
    can be stretched back over the whole original image. Every runtime prepares images here.
    """
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    resized = rgb.resize((resolution, resolution), Image.Resampling.BICUBIC)
    array = np.asarray(resized).transpose(2, 0, 1).astype(np.float32)
    array *= _PIXEL_SCALE
    array += _PIXEL_OFFSET
    return array


def resolve_device(device: str) -> torch.device:
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def device_type(device: str) -> str:
    """ "cuda" or "cpu" for a device setting. Without an NVIDIA driver, "auto" is the CPU
    and torch is not imported to find that out: `bentoml serve` and the API process, which
    only need to know whether to batch, start seconds sooner."""
    if device.startswith(("cpu", "cuda")):
        return device.split(":")[0]
    if device == "auto" and not _nvidia_driver_present():
        return "cpu"
    return resolve_device(device).type


def _nvidia_driver_present() -> bool:
    if sys.platform.startswith("linux"):  # a host, a container given the GPU, or WSL2
        return any(Path(p).exists() for p in ("/proc/driver/nvidia", "/dev/nvidiactl", "/dev/dxg"))
    return sys.platform == "win32"  # torch has no CUDA on macOS


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
# hub client's own retries with backoff took about 30 s to give up (FACTS.md).
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

    def embed(self, batch: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            pixels = torch.from_numpy(np.ascontiguousarray(batch)).to(self.device, self.dtype)
            return self.patch_tokens(pixels).float().cpu().numpy()
