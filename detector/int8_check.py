"""The int8 self-check and what a bank version says of it: pure figures, no runtime.

A graph rounded to int8 may reorder parts that f32 ranks alike, and a threshold is a promise
about an order. So an int8 product (detector.quantized) keeps a few defect-free check images
out of its bank (their scores are held-out scores, as the calibration's are), and its check
scores them with f32 and with int8 features against the same bank: int8 is served only where
the scores' rank correlation is at least 0.99 and the verdicts at the threshold agree on at
least 99 % of them. The scores stay in bank.json, so a new threshold restates the verdicts
from them; a change of the rows or the mask (which changes the scores) needs the check run
again, and until then the product is served in f32 with the reason. Light to import: the
bank store reads it without OpenVINO or torch.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from detector.errors import UserError
from detector.extractor import backbone_pixels, preprocess
from detector.files import file_sha256

INT8_FOLDER = "int8"  # in a fitted model folder and in each bank version that serves int8
GRAPH_FILE = "backbone.xml"  # OpenVINO IR; its weights are backbone.bin beside it
STAMP_FILE = "stamp.json"  # the spec the graph computes (it is the f32 backbone's)
CHECK_IMAGES_FILE = "check_images.npz"  # the check's images at the backbone's input size
INT8_KEY = "int8"  # bank.json: the check, and what it was quantized on
MIN_RANK_CORRELATION = 0.99
MIN_AGREEMENT = 0.99
MIN_CHECK_IMAGES = 8
MAX_CHECK_IMAGES = 16  # 16 x 448 x 448 x 3 bytes, about 6 MB compressed per product
PRECISIONS = ("f32", "int8")  # what a product may ask to be served in


class Int8Unavailable(UserError):
    """int8 was asked for where it cannot be made (a tiled product, too few images, no NNCF)."""


def check_image_count(training_images: int) -> int:
    """How many training images an int8 product keeps out of its bank for the check."""
    count = min(MAX_CHECK_IMAGES, max(MIN_CHECK_IMAGES, training_images // 5))
    if training_images < count + MIN_CHECK_IMAGES:
        raise Int8Unavailable(
            f"precision int8 needs at least {2 * MIN_CHECK_IMAGES} defect-free training "
            f"images ({training_images} given): {MIN_CHECK_IMAGES} are kept out of the bank "
            "to check the int8 backbone against f32. Add images, or fit with precision=f32."
        )
    return count


def bank_identity(bank_size: int, metadata: dict[str, Any]) -> str:
    """What, besides the threshold, decides the check's scores: the bank's rows and the mask.
    Rows are only ever added to a product's bank (a refit makes its own check), so their
    number names them. A change of either runs the check again."""
    mask = metadata.get("inspect_mask") or {}
    return json.dumps([bank_size, mask.get("sha256")], separators=(",", ":"))


@dataclass(frozen=True)
class Int8Check:
    """f32 and int8 scores of the same check images against the same bank, and the verdict."""

    f32_scores: tuple[float, ...]
    int8_scores: tuple[float, ...]
    threshold: float
    rank_correlation: float | None  # None: an order that cannot be compared (all equal)
    agreement: float  # share of the check images whose verdict at the threshold is the same
    largest_score_change: float
    accepted: bool
    reason: str  # the sentence /products and the log show when refused; "" when accepted
    bank: str  # bank_identity() of the bank that made the scores

    @classmethod
    def measure(
        cls, f32: Sequence[float], int8: Sequence[float], threshold: float, bank: str
    ) -> Int8Check:
        from scipy.stats import spearmanr

        f32_scores, int8_scores = np.asarray(f32, float), np.asarray(int8, float)
        rank: float | None = None
        if len(f32_scores) >= 2 and np.ptp(f32_scores) > 0 and np.ptp(int8_scores) > 0:
            rank = round(float(spearmanr(f32_scores, int8_scores).statistic), 6)
        agree = float(np.mean((f32_scores > threshold) == (int8_scores > threshold)))
        reason = ""
        if rank is None:
            reason = (
                f"the {len(f32_scores)} check images' scores cannot be ranked (too few, or "
                "all equal), so the int8 backbone's order cannot be checked"
            )
        elif rank < MIN_RANK_CORRELATION:
            reason = (
                f"the int8 backbone ranks the {len(f32_scores)} check images differently from "
                f"f32 (rank correlation {rank:.4f}, at least {MIN_RANK_CORRELATION} needed)"
            )
        elif agree < MIN_AGREEMENT:
            reason = (
                f"the int8 backbone's verdicts at the threshold {threshold:.6g} agree with "
                f"f32 on {agree:.1%} of the check images (at least {MIN_AGREEMENT:.0%} needed)"
            )
        return cls(
            tuple(float(s) for s in f32_scores),
            tuple(float(s) for s in int8_scores),
            float(threshold),
            rank,
            round(agree, 6),
            float(np.max(np.abs(f32_scores - int8_scores))) if len(f32_scores) else 0.0,
            not reason,
            reason,
            bank,
        )

    def at_threshold(self, threshold: float) -> Int8Check:
        """The same scores judged at another threshold (an operating point change)."""
        return Int8Check.measure(self.f32_scores, self.int8_scores, threshold, self.bank)

    def summary(self) -> dict[str, Any]:
        """What /products and the history show: the figures without the scores."""
        return {
            "images": len(self.f32_scores),
            "rank_correlation": self.rank_correlation,
            "agreement": self.agreement,
            "largest_score_change": round(self.largest_score_change, 6),
            "threshold": self.threshold,
            "accepted": self.accepted,
            "reason": self.reason,
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "f32_scores": list(self.f32_scores),
            "int8_scores": list(self.int8_scores),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Int8Check:
        return cls(
            **{
                **data,
                "f32_scores": tuple(data["f32_scores"]),
                "int8_scores": tuple(data["int8_scores"]),
            }
        )


def status(document: dict[str, Any], bank_size: int) -> dict[str, Any] | None:
    """What a bank version says of int8, as /products and the history show it: None when
    the product asks for f32; else the check as it stands for this version's threshold and
    rows, and what is served ("int8" only when the check holds for them)."""
    section = document.get(INT8_KEY)
    if not section:
        return None
    try:
        return _status(section, document, bank_size)
    except (AttributeError, KeyError, TypeError, ValueError) as error:  # a damaged bank.json
        reason = f"bank.json's int8 section cannot be read ({error!r}): served in f32"
        return {"asked": "int8", "served": "f32", "reason": reason, "check": None}


def _status(section: dict[str, Any], document: dict[str, Any], bank_size: int) -> dict[str, Any]:
    threshold = float(document["calibration"]["threshold"])
    if section.get("check") is None:
        return {
            "asked": "int8",
            "served": "f32",
            "reason": section.get("reason", ""),
            "check": None,
        }
    check = Int8Check.from_dict(section["check"])
    if check.bank != bank_identity(bank_size, document):
        reason = (
            "the bank's rows or mask changed since the int8 check and it was not run again: "
            "`python -m detector check-int8 PRODUCT` runs it on the stored check images"
        )
        return {"asked": "int8", "served": "f32", "reason": reason, "check": check.summary()}
    if check.threshold != threshold:
        check = check.at_threshold(threshold)
    served = "int8" if check.accepted else "f32"
    return {"asked": "int8", "served": served, "reason": check.reason, "check": check.summary()}


def graph_sha256(folder: Path) -> str:
    """The int8 graph's own fingerprint (its IR and weights): the check names the graph it
    ran on, so no version is ever served by another (a copied or restored folder)."""
    weights = Path(GRAPH_FILE).with_suffix(".bin").name
    return file_sha256(folder / GRAPH_FILE, folder / weights)[:16]


def has_graph(version_folder: Path) -> bool:
    return (Path(version_folder) / INT8_FOLDER / GRAPH_FILE).is_file()


def save_check_images(folder: Path, images: Sequence[Image.Image], resolution: int) -> None:
    """The check's images as the backbone sees them (`backbone_pixels`: `preprocess` of the
    stored pixels gives the very same input again), with their original sizes."""
    pixels = np.stack([np.asarray(backbone_pixels(image, resolution)) for image in images])
    sizes = np.asarray([image.size for image in images], dtype=np.int64)
    np.savez_compressed(folder / CHECK_IMAGES_FILE, pixels=pixels, sizes=sizes)


def load_check_images(folder: Path) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """(prepared images, original sizes) of the stored check images."""
    with np.load(folder / CHECK_IMAGES_FILE) as stored:
        pixels, sizes = stored["pixels"], stored["sizes"]
    resolution = pixels.shape[1]
    prepared = np.stack([preprocess(Image.fromarray(p), resolution) for p in pixels])
    return prepared, [(int(w), int(h)) for w, h in sizes]
