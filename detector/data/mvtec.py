"""Read a dataset in the MVTec AD folder layout, any category.

<root>/<category>/train/good/*.png              (or train/good/<session>/*.png)
<root>/<category>/test/<good|defect>/*.png
<root>/<category>/ground_truth/<defect>/<stem>_mask.png
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from detector.errors import UserError
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
        return [path for path, _ in self.train_sessions()]

    def train_sessions(self, manifest: Path | None = None) -> list[tuple[Path, str]]:
        """Defect-free training images with their capture session.

        Images directly in train/good are one session ("good"); each subfolder
        train/good/<session>/ is another. A manifest CSV (columns path, session; paths
        relative to train/good, or absolute) names the sessions instead: every training
        image, and nothing else. Hidden subfolders (".thumbnails") are not sessions.
        """
        good = self._require(self.folder / "train" / GOOD)
        pairs = [(path, GOOD) for path in images_in(good, allow_empty=True)]
        for folder in sorted(p for p in good.iterdir() if p.is_dir() and p.name[0] != "."):
            pairs += [(path, folder.name) for path in images_in(folder, allow_empty=True)]
        if not pairs:
            raise FileNotFoundError(f"{good} holds no images")
        if manifest is None:
            return pairs
        named = read_session_manifest(manifest, good)
        missing = [path for path, _ in pairs if path.resolve() not in named]
        if missing:
            raise UserError(
                f"{manifest} names no session for {len(missing)} training image(s), such as "
                f"{missing[0]}: list every image of {good} with its session."
            )
        extra = set(named) - {path.resolve() for path, _ in pairs}
        if extra:
            raise UserError(
                f"{manifest} names {len(extra)} file(s) that are not training images of "
                f"{good}, such as {sorted(extra)[0]}: the manifest says sessions, it adds "
                "no images."
            )
        return [(path, named[path.resolve()]) for path, _ in pairs]

    def calibration_paths(self) -> list[Path]:
        """None in this layout: a later session is data.calibration_dir."""
        return []

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


def read_session_manifest(manifest: Path, base: Path) -> dict[Path, str]:
    """{resolved image path: session} from a CSV with columns path and session."""
    if not manifest.is_file():
        raise UserError(f"{manifest} is not a file: data.sessions_manifest names a CSV.")
    with manifest.open(newline="") as handle:
        reader = csv.DictReader(handle)
        if not {"path", "session"} <= set(reader.fieldnames or []):
            raise UserError(f"{manifest} needs the columns path and session.")
        named = {}
        for line, row in enumerate(reader, start=2):
            path, session = (row["path"] or "").strip(), (row["session"] or "").strip()
            if not path or not session:
                raise UserError(f"{manifest}, line {line}: a path and a session are needed.")
            resolved = (base / path).resolve()
            if named.get(resolved, session) != session:
                raise UserError(f"{manifest}, line {line}: {path} is named in two sessions.")
            named[resolved] = session
    return named


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
        # Any nonzero pixel is a defect: MVTec AD's masks are 0/255, VisA's 0/class index.
        resized = mask.convert("L").resize(size, Image.Resampling.NEAREST)
        return np.asarray(resized) > 0


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
