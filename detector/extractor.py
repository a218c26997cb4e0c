"""What the detector needs of a feature extractor, and nothing that runs one: the spec a
bank records (so it is never served with another backbone), the extractor protocol, the
preprocessing every runtime shares, and the device setting. Light to import: no torch, no
transformers (the API process and `bentoml serve` read specs without them).

The extractors themselves: `detector.dino` (torch), `detector.runtimes` (ONNX Runtime,
OpenVINO); `detector.backbone` makes one.
"""

from __future__ import annotations

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
_NUDGED = False  # the tiling nudge was said in this process
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


def stored_name(spec: BackboneSpec, suffix: str) -> str:
    """The file name an exported form of a backbone is stored under (`.onnx`, `.pt`)."""
    return f"{spec_prefix(spec.resolution, spec.layers)}{spec.fingerprint}{suffix}"


def spec_prefix(resolution: int, layers: Sequence[int]) -> str:
    """What a stored form's name starts with for this resolution and layer set (any
    weights: the caller checks the stamped spec, fingerprint included, against the bank's)."""
    return f"r{resolution}-l{'_'.join(str(layer) for layer in layers)}-"


def find_stored(folder: Path, resolution: int, layers: Sequence[int], suffix: str) -> Path | None:
    """A stored form in `folder` for this resolution and layer set, or None."""
    found = sorted(folder.glob(f"{spec_prefix(resolution, layers)}*{suffix}"))
    return found[0] if found else None


class FeatureExtractor(Protocol):
    """What the detector needs from a backbone; any model that yields patch grids fits."""

    spec: BackboneSpec
    device: torch.device
    random_weights: bool  # scores mean nothing; every surface that shows a score says so

    def prepare(self, image: Image.Image) -> np.ndarray:
        """One RGB image -> a (3, H, W) float32 array ready for `embed`."""

    def embed(self, batch: np.ndarray) -> np.ndarray:
        """A (B, 3, H, W) batch -> (B, h, w, D) float32 patch features."""


def preprocess(image: Image.Image, resolution: int, *, tile: bool = False) -> np.ndarray:
    """Resize to a square `resolution` and normalise with ImageNet statistics: (3, H, W).

    Squashing instead of cropping keeps every pixel of the part in view, so the anomaly map
    can be stretched back over the whole original image. Every runtime prepares images here
    (`tile`: a tile of a tiled frame, detector.tiling).
    """
    if not tile and max(image.size) > 2 * resolution and not _NUDGED:
        _nudge_towards_tiling(image.size, resolution)
    array = np.asarray(backbone_pixels(image, resolution)).transpose(2, 0, 1).astype(np.float32)
    array *= _PIXEL_SCALE
    array += _PIXEL_OFFSET
    return array


def backbone_pixels(image: Image.Image, resolution: int) -> Image.Image:
    """The RGB square the backbone sees of an image, before normalisation."""
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    return rgb.resize((resolution, resolution), Image.Resampling.BICUBIC)


def _nudge_towards_tiling(size: tuple[int, int], resolution: int) -> None:
    """Said once in a process, at its first large frame: a frame shrunk to the input loses
    what is smaller than a few of its pixels per patch."""
    global _NUDGED
    _NUDGED = True
    shrink = max(size) / resolution
    log.warning(
        "frames of %d x %d px are resized to %d px for the backbone (%.1fx smaller): defects "
        "smaller than about %d px may be lost; fit the product with tiling.enabled=true to "
        "inspect tiles at native resolution (README, 'High-resolution frames')",
        *size,
        resolution,
        shrink,
        round(4 * shrink),
    )


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
