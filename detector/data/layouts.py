"""Data sets in their own layouts, read as one kind of category: MVTec AD, MVTec AD 2, VisA.

Each reader gives the training images (with their capture sessions), the test samples
(label, defect type, mask) and, where the layout has them, defect-free images of a later
session that set the threshold (MVTec AD 2's validation set). `data.layout` picks one.

MVTec AD 2 (2025, high-resolution, small defects)::

    <root>/<category>/train/good/*.png
    <root>/<category>/validation/good/*.png           a calibration session
    <root>/<category>/test_public/good|bad/*.png
    <root>/<category>/test_public/ground_truth/bad/<stem>_mask.png

Its private test sets (test_private, test_private_mixed) carry no ground truth and are not
read. VisA::

    <root>/split_csv/1cls.csv     object,split,label,image,mask (paths relative to <root>)

with split train|test and label normal|anomaly; its masks mark defects with any nonzero
value.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from detector.data.mvtec import GOOD, MVTecCategory, Sample
from detector.errors import UserError
from detector.images import images_in

LAYOUTS = ("mvtec", "mvtec_ad2", "visa")


def _single_session(manifest: Path | None, layout: str) -> None:
    if manifest is not None:
        raise UserError(f"data.sessions_manifest is for the MVTec AD layout, not {layout}.")


@dataclass(frozen=True)
class MVTecAD2Category:
    root: Path
    category: str

    @property
    def folder(self) -> Path:
        return Path(self.root).expanduser() / self.category

    def _images(self, *parts: str) -> list[Path]:
        folder = self.folder.joinpath(*parts)
        if not folder.is_dir():
            raise FileNotFoundError(
                f"{folder} does not exist: data.root must hold MVTec AD 2 category folders "
                f"(<root>/{self.category}/train/good, validation/good, test_public/good|bad)."
            )
        return images_in(folder, allow_empty=True)

    def train_paths(self) -> list[Path]:
        return self._images("train", GOOD)

    def train_sessions(self, manifest: Path | None = None) -> list[tuple[Path, str]]:
        _single_session(manifest, "mvtec_ad2")
        return [(path, GOOD) for path in self.train_paths()]

    def calibration_paths(self) -> list[Path]:
        """validation/good: defect-free images of their own, a calibration session."""
        return self._images("validation", GOOD)

    def test_samples(self) -> list[Sample]:
        masks = self.folder / "test_public" / "ground_truth" / "bad"
        samples = [Sample(path, 0, GOOD, None) for path in self._images("test_public", GOOD)]
        for path in self._images("test_public", "bad"):
            mask = masks / f"{path.stem}_mask.png"
            samples.append(Sample(path, 1, "bad", mask if mask.exists() else None))
        return samples


@dataclass(frozen=True)
class VisACategory:
    root: Path
    category: str
    split_csv: str = "split_csv/1cls.csv"

    @property
    def folder(self) -> Path:
        return Path(self.root).expanduser() / self.category

    def _rows(self) -> list[dict[str, str]]:
        table = Path(self.root).expanduser() / self.split_csv
        if not table.is_file():
            raise FileNotFoundError(
                f"{table} does not exist: data.root must hold VisA's split_csv/1cls.csv "
                "and its category folders."
            )
        with table.open(newline="") as handle:
            rows = [row for row in csv.DictReader(handle) if row.get("object") == self.category]
        if not rows:
            raise UserError(f"{table} lists no images of {self.category!r}.")
        return rows

    def _path(self, relative: str) -> Path:
        return Path(self.root).expanduser() / relative

    def train_paths(self) -> list[Path]:
        rows = self._rows()
        return [self._path(r["image"]) for r in rows if r["split"] == "train"]

    def train_sessions(self, manifest: Path | None = None) -> list[tuple[Path, str]]:
        _single_session(manifest, "visa")
        return [(path, GOOD) for path in self.train_paths()]

    def calibration_paths(self) -> list[Path]:
        return []  # VisA has no later session: the fit cross-fits

    def test_samples(self) -> list[Sample]:
        samples = []
        for row in (r for r in self._rows() if r["split"] == "test"):
            defective = row["label"] != "normal"
            mask = self._path(row["mask"]) if defective and row.get("mask") else None
            defect = "anomaly" if defective else GOOD
            samples.append(Sample(self._path(row["image"]), int(defective), defect, mask))
        return samples


Category = MVTecCategory | MVTecAD2Category | VisACategory


def open_category(layout: str, root: Path, category: str) -> Category:
    """The reader `data.layout` names."""
    readers = {"mvtec": MVTecCategory, "mvtec_ad2": MVTecAD2Category, "visa": VisACategory}
    if layout not in readers:
        raise UserError(f"data.layout is {layout!r}: use one of {', '.join(LAYOUTS)}.")
    return readers[layout](Path(root), category)
