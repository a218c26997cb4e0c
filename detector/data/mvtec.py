"""Read a dataset in the MVTec AD folder layout, any category.

<root>/<category>/train/good/*.png
<root>/<category>/test/<good|defect>/*.png
<root>/<category>/ground_truth/<defect>/<stem>_mask.png
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from detector.images import images_in

GOOD = "good"


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int  # 0 defect-free, 1 defective
    defect_type: str
    mask_path: Path | None


@dataclass(frozen=True)
class MVTecCategory:
    root: Path
    category: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root).expanduser())

    @property
    def folder(self) -> Path:
        return self.root / self.category

    def _require(self, folder: Path) -> Path:
        if not folder.is_dir():
            raise FileNotFoundError(
                f"{folder} does not exist: data.root must hold MVTec AD category folders "
                f"(<root>/{self.category}/train/good, test/<defect>, ground_truth/<defect>)."
            )
        return folder

    def train_paths(self) -> list[Path]:
        paths = images_in(self._require(self.folder / "train" / GOOD), allow_empty=True)
        if not paths:
            raise FileNotFoundError(f"{self.folder / 'train' / GOOD} holds no images")
        return paths

    def test_samples(self) -> list[Sample]:
        samples = []
        for defect_folder in sorted(p for p in self._require(self.folder / "test").iterdir()):
            if not defect_folder.is_dir():
                continue
            defect = defect_folder.name
            for path in images_in(defect_folder, allow_empty=True):
                mask = None
                if defect != GOOD:
                    candidate = self.folder / "ground_truth" / defect / f"{path.stem}_mask.png"
                    mask = candidate if candidate.exists() else None
                samples.append(Sample(path, int(defect != GOOD), defect, mask))
        return samples


def load_mask(sample: Sample, size: tuple[int, int]) -> np.ndarray | None:
    """Boolean (height, width) mask at `size` (width, height); all False for good images.

    None for a defective image whose mask is missing, so pixel metrics can leave it out
    instead of counting its defect as normal pixels.
    """
    if sample.label == 0:
        return np.zeros((size[1], size[0]), dtype=bool)
    if sample.mask_path is None:
        return None
    with Image.open(sample.mask_path) as mask:
        resized = mask.convert("L").resize(size, Image.Resampling.NEAREST)
        return np.asarray(resized) > 127


def split_calibration(
    paths: list[Path], fraction: float, seed: int, minimum: int = 1
) -> tuple[list[Path], list[Path]]:
    """Seeded split of defect-free images into (bank, calibration); both keep at least one."""
    if len(paths) < 2:
        raise ValueError("need at least 2 defect-free images: one for the bank, one to calibrate")
    count = min(len(paths) - 1, max(minimum, int(round(len(paths) * fraction))))
    order = np.random.default_rng(seed).permutation(len(paths))
    held_out = set(order[:count].tolist())
    bank = [path for i, path in enumerate(paths) if i not in held_out]
    calibration = [path for i, path in enumerate(paths) if i in held_out]
    return bank, calibration
