"""Where each bank row came from, and small crops of the patches a flag is explained by.

A reviewer sees a hot spot but not why it is hot. The flagged region's nearest bank row
answers it: a normal patch from a named training image, at a known place, shown beside the
flagged one. Far from every row ("never seen") reads differently from close to a row that
looks a little different ("seen, slightly different"): the distance, set against the bank's
own covering radius, says which.

A fit records, for each row it keeps, the training image, and the cell of that image's
patch grid (the whole frame's grid for tiled products, so a tile is found from the cell).
Rows added later (reviewed false alarms, sessions) come from images the bank no longer
names: their source is `ADDED_LATER`. Crops are cut from what the backbone saw (the resized
square, or a tiled product's scaled frame), a cell and `CROP_CONTEXT` cells around it, at
`CROP_SIDE` px; at most `CROP_BUDGET_BYTES` of them per bank version (uncompressed), spread
over the rows beyond that (the others have a source but no crop). The crops never change
after the fit: versions share their file. Backbone-agnostic: rows, cells and pixels only.
"""

from __future__ import annotations

import base64
import io
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from detector.extractor import IMAGENET_MEAN, IMAGENET_STD

PROVENANCE_FILE = "provenance.npz"
CROPS_FILE = "crops.npz"
CROP_SIDE = 32  # px of a stored or returned crop
CROP_CONTEXT = 1  # cells around the patch shown with it: a 3 x 3-cell window
CROP_BUDGET_BYTES = 16 * 2**20  # uncompressed crop pixels a bank version keeps at most
ADDED_LATER = -1  # a row added after the fit: its image is not named by the bank
NOT_EXPLAINED = (
    "this bank version was saved before bank rows kept where they came from: refit the "
    "product (or make a new version from a fit) to explain its flags"
)


@dataclass(frozen=True)
class NearestPatch:
    """The most anomalous cell of an image and the bank row nearest to its feature."""

    cell: tuple[int, int]  # (row, column) in the image's patch grid
    grid: tuple[int, int]  # (rows, columns) of that grid
    distance: float  # cosine distance from the cell's feature to `row`
    row: int  # index of the nearest bank row


@dataclass
class Provenance:
    """Each bank row's source (image, cell row, cell column), and crops of fit rows spread
    over the bank within the budget; `images` names the images."""

    images: list[str]  # the fit's training images, then the images later changes added
    sources: np.ndarray  # (rows, 3) int32; ADDED_LATER in every column: image not named
    grid: tuple[int, int]  # the training images' patch grid
    crops: np.ndarray  # (n, CROP_SIDE, CROP_SIDE, 3) uint8
    crop_of: np.ndarray  # (rows,) int32: each row's crop in `crops`, -1 for none
    fit_images: int = -1  # how many of `images` the fit read (-1: all of them)

    def __post_init__(self) -> None:
        if self.fit_images < 0:
            self.fit_images = len(self.images)

    @classmethod
    def of_rows(
        cls, indices: np.ndarray, grid: tuple[int, int], images: Sequence[str]
    ) -> Provenance:
        """Rows kept from a stream of whole images' grids, in order: row i of the stream
        is cell i % (rows x columns) of image i // (rows x columns). No crops yet."""
        image, cell = np.divmod(np.asarray(indices, dtype=np.int64), grid[0] * grid[1])
        row, column = np.divmod(cell, grid[1])
        sources = np.stack([image, row, column], axis=1).astype(np.int32)
        empty = np.zeros((0, CROP_SIDE, CROP_SIDE, 3), np.uint8)
        none = np.full(len(sources), -1, np.int32)
        return cls(list(images), sources, (int(grid[0]), int(grid[1])), empty, none)

    def extended(
        self,
        added: int,
        names: Sequence[str] | None = None,
        positions: np.ndarray | None = None,
        grid: tuple[int, ...] | None = None,
    ) -> Provenance:
        """The provenance after `added` rows taken at `positions` of a stream of whole
        `grid`s of the images `names` (a reviewed false alarm's record, a session's image);
        without them, or on another grid, the rows' image is not named. Only the images
        that gave rows are named: the list grows no faster than the bank."""
        images = self.images
        if names is None or positions is None or tuple(grid or ()) != self.grid:
            later = np.full((added, 3), ADDED_LATER, np.int32)
        else:
            later = Provenance.of_rows(positions, self.grid, names).sources
            used, later[:, 0] = np.unique(later[:, 0], return_inverse=True)
            later[:, 0] += len(images)
            images = [*images, *(names[i] for i in used)]
        sources = np.concatenate([self.sources, later])
        crop_of = np.concatenate([self.crop_of, np.full(added, -1, np.int32)])
        return Provenance(images, sources, self.grid, self.crops, crop_of, self.fit_images)

    @property
    def nbytes(self) -> int:
        """Memory it holds: what a bank cache counts."""
        return int(self.sources.nbytes + self.crops.nbytes + self.crop_of.nbytes)

    def crop_plan(self, budget_bytes: int = CROP_BUDGET_BYTES) -> np.ndarray:
        """The rows that get a crop within the budget: every row when they fit, else rows
        spread evenly over the bank (rows follow the training images' order: the first
        rows alone would show the first images only)."""
        rows, room = len(self.sources), budget_bytes // (CROP_SIDE * CROP_SIDE * 3)
        if rows <= room:
            return np.arange(rows)
        return np.unique(np.linspace(0, rows - 1, room).round().astype(np.int64))

    def source(self, row: int) -> dict[str, Any]:
        """Where bank row `row` came from, its crop as a PNG data URL where one is kept."""
        if not 0 <= row < len(self.sources):  # an approximate index may answer -1
            raise IndexError(f"the bank has no row {row}")
        image, cell_row, column = (int(v) for v in self.sources[row])
        if image == ADDED_LATER or image >= self.fit_images:
            return {
                "image": None if image == ADDED_LATER else self.images[image],
                "cell": None if image == ADDED_LATER else [cell_row, column],
                "crop": None,
                "why_no_crop": "a row added after the fit (a reviewed false alarm or a "
                "later session): its image is kept in the records, not in the bank",
            }
        crop = int(self.crop_of[row])
        return {
            "image": self.images[image],
            "cell": [cell_row, column],
            "crop": png_data_url(self.crops[crop]) if crop >= 0 else None,
            "why_no_crop": None
            if crop >= 0
            else f"crops are kept for {len(self.crops)} of the fit's rows, spread over the "
            f"bank ({CROP_BUDGET_BYTES // 2**20} MiB per bank version)",
        }

    def save(self, directory: str | Path) -> Path:
        """provenance.npz, and the crops in crops.npz written byte for byte the same for
        the same crops, so versions that keep the fit's crops share one file."""
        directory = Path(directory)
        path = directory / PROVENANCE_FILE
        with open(path, "wb") as file:
            np.savez_compressed(
                file,
                images=np.asarray(self.images, dtype=str),
                sources=self.sources,
                grid=np.asarray(self.grid),
                crop_of=self.crop_of,
                fit_images=np.asarray(self.fit_images),
            )
        member = zipfile.ZipInfo("crops.npy", date_time=(1980, 1, 1, 0, 0, 0))
        member.compress_type = zipfile.ZIP_DEFLATED
        with (
            zipfile.ZipFile(directory / CROPS_FILE, "w") as archive,
            archive.open(member, "w", force_zip64=True) as file,
        ):
            np.lib.format.write_array(file, np.ascontiguousarray(self.crops), allow_pickle=False)
        return path

    @classmethod
    def load(cls, directory: str | Path) -> Provenance | None:
        """A saved bank's provenance; None for a bank saved before it was kept."""
        directory = Path(directory)
        if not (directory / PROVENANCE_FILE).exists():
            return None
        with np.load(directory / PROVENANCE_FILE, allow_pickle=False) as stored:
            grid = tuple(int(v) for v in stored["grid"])
            names = [str(n) for n in stored["images"]]
            sources, crop_of = stored["sources"], stored["crop_of"]
            fit_images = int(stored["fit_images"])
        with np.load(directory / CROPS_FILE, allow_pickle=False) as stored:
            crops = stored["crops"]
        return cls(names, sources, grid, crops, crop_of, fit_images)


def image_name(images: Sequence[Any], index: int) -> str:
    """How training image `index` is named in explanations: as the sequence names it
    (`name_of`: augmented copies, uploads), a file by its folder and name (enough to find
    it, without the server's whole path), anything else by its position. Lazy sequences
    are never indexed here: that would decode the image."""
    name_of = getattr(images, "name_of", None)
    if name_of is not None:
        return str(name_of(index))
    source = images[index] if isinstance(images, list | tuple) else None
    if isinstance(source, str | Path):
        path = Path(source)
        return f"{path.parent.name}/{path.name}" if path.parent.name else path.name
    return f"training image {index + 1}"


def added_names(hashes: list[str], records: list[str] | None = None) -> list[str]:
    """How added images are named in the bank's provenance: the images of `records` (the
    last ones, as the service appends them) by their record, the others by their hash."""
    names = [f"added image {digest[:12]}" for digest in hashes]
    if records:
        names[len(names) - len(records) :] = [f"record {record}" for record in records]
    return names


def input_pixels(prepared: np.ndarray) -> np.ndarray:
    """What the backbone saw of an image, as (H, W, 3) uint8: a prepared (3, R, R) array
    with its ImageNet normalisation undone, or a tiled product's scaled frame as it is."""
    if prepared.dtype == np.uint8:
        return prepared
    pixels = prepared.transpose(1, 2, 0) * IMAGENET_STD + IMAGENET_MEAN
    return np.clip(np.rint(pixels * 255.0), 0, 255).astype(np.uint8)


def cell_box(
    cell: tuple[int, int], grid: tuple[int, int], size: tuple[int, int], context: int = 0
) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) px of a grid cell, with `context` cells around it, in an
    image of `size` (width, height) over which the grid is laid (squashed, as preprocessing
    squashes), shifted to stay inside it."""
    boxes = []
    for position, cells, pixels in ((cell[1], grid[1], size[0]), (cell[0], grid[0], size[1])):
        span = min(cells, 1 + 2 * context)
        first = min(max(position - context, 0), cells - span)
        boxes.append((round(first * pixels / cells), round((first + span) * pixels / cells)))
    (left, right), (top, bottom) = boxes
    return left, top, max(right, left + 1), max(bottom, top + 1)


def cell_crop(pixels: np.ndarray, cell: tuple[int, int], grid: tuple[int, int]) -> np.ndarray:
    """A cell and its context, cut from (H, W, 3) pixels, at CROP_SIDE x CROP_SIDE."""
    height, width = pixels.shape[:2]
    left, top, right, bottom = cell_box(cell, grid, (width, height), CROP_CONTEXT)
    crop = Image.fromarray(np.ascontiguousarray(pixels[top:bottom, left:right]))
    return np.asarray(crop.resize((CROP_SIDE, CROP_SIDE), Image.Resampling.BILINEAR))


def png_data_url(pixels: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def explanation(
    nearest: NearestPatch | None,
    provenance: Provenance | None,
    flagged_pixels: np.ndarray | None,
    image_size: tuple[int, int],
    covering_radius: float,
) -> dict[str, Any]:
    """What a reviewer is shown for an image: its most anomalous cell beside the normal
    patch nearest to it, or why that cannot be shown."""
    if nearest is None:
        return {"available": False, "why": "no cell of this image was inspected"}
    if provenance is None:
        return {"available": False, "why": NOT_EXPLAINED}
    seen = nearest.distance <= 2.0 * covering_radius
    return {
        "available": True,
        "flagged": {
            "cell": list(nearest.cell),
            "grid": list(nearest.grid),
            "box": list(cell_box(nearest.cell, nearest.grid, image_size)),
            "crop": None
            if flagged_pixels is None
            else png_data_url(cell_crop(flagged_pixels, nearest.cell, nearest.grid)),
        },
        "nearest_normal": {"row": nearest.row, **provenance.source(nearest.row)},
        "distance": nearest.distance,
        "covering_radius": covering_radius,
        "reading": "seen, slightly different" if seen else "never seen",
        "reading_why": (
            f"the flagged patch is {nearest.distance:.4f} from its nearest normal patch; "
            f"the bank covers its own training patches within {covering_radius:.4f}"
            + (": close to what the bank has seen" if seen else ": far from anything seen")
        ),
    }
