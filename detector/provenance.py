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
`CROP_SIDE` px; at most `CROP_BUDGET_BYTES` of them per bank version (uncompressed), the rows
beyond have a source but no crop. Backbone-agnostic: rows, cells and pixels only.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from detector.extractor import IMAGENET_MEAN, IMAGENET_STD

PROVENANCE_FILE = "provenance.npz"
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
    """Each bank row's source (training image, cell row, cell column) and the first rows'
    crops; `images` names the training images."""

    images: list[str]  # the fit's training images, then the images later changes added
    sources: np.ndarray  # (rows, 3) int32; ADDED_LATER in every column: image not named
    grid: tuple[int, int]  # the training images' patch grid
    crops: np.ndarray  # (n, CROP_SIDE, CROP_SIDE, 3) uint8 for rows 0 .. n - 1
    fit_images: int = -1  # how many of `images` the fit read (-1: all of them)

    def __post_init__(self) -> None:
        if self.fit_images < 0:
            self.fit_images = len(self.images)

    @classmethod
    def of_rows(
        cls, indices: np.ndarray, grid: tuple[int, int], images: Sequence[str]
    ) -> Provenance:
        """Rows kept from a stream of whole images' grids, in order: row i of the stream
        is cell i % (rows x columns) of image i // (rows x columns)."""
        image, cell = np.divmod(np.asarray(indices, dtype=np.int64), grid[0] * grid[1])
        row, column = np.divmod(cell, grid[1])
        sources = np.stack([image, row, column], axis=1).astype(np.int32)
        empty = np.zeros((0, CROP_SIDE, CROP_SIDE, 3), np.uint8)
        return cls(list(images), sources, (int(grid[0]), int(grid[1])), empty)

    def extended(
        self,
        added: int,
        names: Sequence[str] | None = None,
        positions: np.ndarray | None = None,
        grid: tuple[int, ...] | None = None,
    ) -> Provenance:
        """The provenance after `added` rows taken at `positions` of a stream of whole
        `grid`s of the images `names` (a reviewed false alarm's record, a session's image);
        without them, or on another grid, the rows' image is not named."""
        if names is None or positions is None or tuple(grid or ()) != self.grid:
            later = np.full((added, 3), ADDED_LATER, np.int32)
            images = self.images
        else:
            later = Provenance.of_rows(positions, self.grid, names).sources
            later[:, 0] += len(self.images)
            images = [*self.images, *names]
        sources = np.concatenate([self.sources, later])
        return Provenance(images, sources, self.grid, self.crops, self.fit_images)

    @property
    def nbytes(self) -> int:
        """Memory it holds: what a bank cache counts."""
        return int(self.sources.nbytes + self.crops.nbytes)

    def crop_rows(self, budget_bytes: int = CROP_BUDGET_BYTES) -> int:
        """How many rows (from the first) get a crop within the budget."""
        return min(len(self.sources), budget_bytes // (CROP_SIDE * CROP_SIDE * 3))

    def source(self, row: int) -> dict[str, Any]:
        """Where bank row `row` came from, its crop as a PNG data URL where one is kept."""
        image, cell_row, column = (int(v) for v in self.sources[row])
        if image == ADDED_LATER or image >= self.fit_images:
            return {
                "image": None if image == ADDED_LATER else self.images[image],
                "cell": None if image == ADDED_LATER else [cell_row, column],
                "crop": None,
                "why_no_crop": "a row added after the fit (a reviewed false alarm or a "
                "later session): its image is kept in the records, not in the bank",
            }
        kept = row < len(self.crops)
        return {
            "image": self.images[image],
            "cell": [cell_row, column],
            "crop": png_data_url(self.crops[row]) if kept else None,
            "why_no_crop": None
            if kept
            else f"only the first {len(self.crops)} rows keep a crop "
            f"({CROP_BUDGET_BYTES // 2**20} MiB per bank version)",
        }

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / PROVENANCE_FILE
        with open(path, "wb") as file:
            np.savez_compressed(
                file,
                images=np.asarray(self.images, dtype=str),
                sources=self.sources,
                grid=np.asarray(self.grid),
                crops=self.crops,
                fit_images=np.asarray(self.fit_images),
            )
        return path

    @classmethod
    def load(cls, directory: str | Path) -> Provenance | None:
        """A saved bank's provenance; None for a bank saved before it was kept."""
        path = Path(directory) / PROVENANCE_FILE
        if not path.exists():
            return None
        with np.load(path, allow_pickle=False) as stored:
            grid = tuple(int(v) for v in stored["grid"])
            names = [str(n) for n in stored["images"]]
            fit_images = int(stored["fit_images"]) if "fit_images" in stored else len(names)
            return cls(names, stored["sources"], grid, stored["crops"], fit_images)


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
