"""Tiles at native resolution: small defects on large frames, seen at the scale they have.

Resizing a 5 MP frame to the backbone's 448 px shrinks a 10-px scratch to 2 px, an eighth of a
patch, and averages it away. With tiling, a product's frames are scaled (`scale`, 1.0 =
native) and cut into overlapping square tiles of `tile` px that the backbone sees one by one;
their patch grids are put back together into one grid of the whole frame, so the bank,
the image score, the anomaly map and drift work on it exactly as on an untiled grid.

How overlaps combine: tile origins sit on the patch grid, so a cell of the frame's grid is
covered by the same patch in every tile that covers it; it takes its feature from the tile
whose centre is nearest (the tile it is deepest inside: the most context on every side),
the overlap-tile strategy of image segmentation. Nothing is averaged, so a cell's feature is
always a real patch feature the bank can match; the map is smoothed over the whole frame
afterwards (`scoring.anomaly_map`), across tile borders as within a tile.

Every frame of a tiled product is first resized to the product's `frame` (the size of its
first training image, recorded at fit), so all its frames have one layout: the same tiles,
batched together, and one grid shape.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from detector.extractor import BackboneSpec, FeatureExtractor, preprocess

if TYPE_CHECKING:
    import torch

TILING_KEY = "tiling"  # in bank.json
TILE_BATCH = 8  # tiles per backbone call: one image's tiles pass in a few batches


class TilingError(ValueError):
    """A tiling setting that cannot describe a layout (the message says which)."""


@dataclass(frozen=True)
class Tiling:
    """A product's tiling, as its fit config names it (`tiling.*`) and its bank keeps it."""

    enabled: bool = False
    tile: int = 448  # side of a tile in px of the scaled frame
    overlap: float = 0.25  # share of a tile its neighbour also covers
    scale: float = 1.0  # frame scale before tiling: 1.0 = native resolution
    frame: tuple[int, int] | None = None  # (width, height) every frame is brought to

    def __post_init__(self) -> None:
        if self.tile < 16:
            raise TilingError(f"tiling.tile is {self.tile} px: it must be at least 16")
        if not 0 <= self.overlap < 0.9:
            raise TilingError(f"tiling.overlap is {self.overlap}: it must be in [0, 0.9)")
        if not 0 < self.scale <= 4:
            raise TilingError(f"tiling.scale is {self.scale}: it must be in (0, 4]")

    def to_dict(self) -> dict[str, Any]:
        document = asdict(self)
        document["frame"] = list(self.frame) if self.frame else None
        return document

    @classmethod
    def from_metadata(cls, metadata: dict[str, Any]) -> Tiling | None:
        """The tiling a bank was fitted with; None for an untiled bank."""
        stored = metadata.get(TILING_KEY)
        if not stored or not stored.get("enabled"):
            return None
        frame = stored.get("frame")
        return cls(**{**stored, "frame": tuple(frame) if frame else None})

    def for_frame(self, size: tuple[int, int]) -> Tiling:
        """This tiling for frames of `size` (width, height): the fit's first image sets it."""
        return replace(self, frame=(int(size[0]), int(size[1])))


@dataclass(frozen=True)
class Layout:
    """Where the tiles of a frame lie, in cells of the frame's patch grid."""

    cell: float  # px of the scaled frame per grid cell
    cells: int  # cells per tile side (the backbone's grid)
    grid: tuple[int, int]  # (rows, columns) of the whole frame's grid
    row_origins: tuple[int, ...]  # first cell of each tile row
    column_origins: tuple[int, ...]

    @property
    def frame_px(self) -> tuple[int, int]:
        """(width, height) of the scaled frame the tiles are cut from."""
        return round(self.grid[1] * self.cell), round(self.grid[0] * self.cell)

    @property
    def tiles(self) -> int:
        return len(self.row_origins) * len(self.column_origins)


def _origins(cells_total: int, cells: int, stride: int) -> tuple[int, ...]:
    """Tile origins along one axis: every `stride` cells, the last one flush with the end."""
    if cells_total <= cells:
        return (0,)
    count = math.ceil((cells_total - cells) / stride) + 1
    return tuple(min(index * stride, cells_total - cells) for index in range(count))


def layout(tiling: Tiling, spec: BackboneSpec) -> Layout:
    """The tiles of `tiling.frame` for a backbone of `spec`, on a grid that every tile's
    patch grid lies on exactly (the scaled frame is rounded to whole cells)."""
    if tiling.frame is None:
        raise TilingError("the tiling has no frame size yet: a fit sets it from its images")
    cells = spec.resolution // spec.patch_size
    cell = tiling.tile / cells
    width, height = (max(1, round(side * tiling.scale)) for side in tiling.frame)
    grid = (max(cells, round(height / cell)), max(cells, round(width / cell)))
    stride = max(1, round(cells * (1 - tiling.overlap)))
    return Layout(
        cell, cells, grid, _origins(grid[0], cells, stride), _origins(grid[1], cells, stride)
    )


def _owned_slices(origins: tuple[int, ...], cells: int, total: int) -> list[slice]:
    """For each tile along an axis, the cells whose nearest tile centre is its own: one
    slice each, together covering the axis once."""
    centres = np.asarray(origins, dtype=np.float64) + cells / 2
    positions = np.arange(total) + 0.5
    owner = np.abs(positions[:, None] - centres[None, :]).argmin(axis=1)
    slices = []
    for tile in range(len(origins)):
        owned = np.flatnonzero(owner == tile)
        slices.append(slice(int(owned[0]), int(owned[-1]) + 1) if owned.size else slice(0, 0))
    return slices


class TiledExtractor:
    """A `FeatureExtractor` that runs another one on the tiles of a frame and returns the
    frame's whole patch grid. `prepare` gives the scaled frame as uint8 (a 20 MP frame is
    60 MB, not the 400 MB its normalised tiles would take); `embed` cuts, normalises and
    runs the tiles `TILE_BATCH` at a time."""

    def __init__(self, inner: FeatureExtractor, tiling: Tiling) -> None:
        self.inner = inner
        self.tiling = tiling
        self.spec = inner.spec
        self.device: torch.device = inner.device
        self.random_weights = inner.random_weights
        self.layout = layout(tiling, inner.spec)
        # For each tile row and column: the slice of the frame's grid it owns.
        self._owned = (
            _owned_slices(self.layout.row_origins, self.layout.cells, self.layout.grid[0]),
            _owned_slices(self.layout.column_origins, self.layout.cells, self.layout.grid[1]),
        )

    def tile_of(self, cell: tuple[int, int]) -> int:
        """The tile (row-major, from 0) whose feature a cell of the frame's grid holds."""
        row, column = (
            next(i for i, owned in enumerate(slices) if owned.start <= position < owned.stop)
            for slices, position in zip(self._owned, cell, strict=True)
        )
        return row * len(self.layout.column_origins) + column

    def prepare(self, image: Image.Image) -> np.ndarray:
        rgb = image if image.mode == "RGB" else image.convert("RGB")
        size = self.layout.frame_px
        if rgb.size != size:
            rgb = rgb.resize(size, Image.Resampling.BICUBIC)
        return np.asarray(rgb)

    def _tile_input(self, frame: np.ndarray, row: int, column: int) -> np.ndarray:
        """The (3, R, R) backbone input of the tile whose first cell is (`row`, `column`)."""
        cell = self.layout.cell
        side = round(self.layout.cells * cell)
        top, left = round(row * cell), round(column * cell)
        crop = Image.fromarray(frame[top : top + side, left : left + side])
        return preprocess(crop, self.spec.resolution, tile=True)

    def embed(self, batch: np.ndarray) -> np.ndarray:
        """(B, H, W, 3) scaled frames -> (B, rows, columns, D) patch grids of whole frames,
        each written in place (a 20 MP frame's grid is 120 MB for ViT-S: never copied)."""
        grids = np.empty((len(batch), *self.layout.grid, self.spec.feature_dim), np.float32)
        for frame, grid in zip(batch, grids, strict=True):
            self._embed_frame(frame, grid)
        return grids

    def _embed_frame(self, frame: np.ndarray, grid: np.ndarray) -> None:
        """One frame's grid, `TILE_BATCH` tiles at a time: each tile writes the cells it owns
        (nearest centre), so memory holds the grid and one batch of tiles, whatever the frame."""
        rows, columns = self.layout.row_origins, self.layout.column_origins
        tiles = [(row, column) for row in range(len(rows)) for column in range(len(columns))]
        for start in range(0, len(tiles), TILE_BATCH):
            chunk = tiles[start : start + TILE_BATCH]
            inputs = [self._tile_input(frame, rows[i], columns[j]) for i, j in chunk]
            features = self.inner.embed(np.stack(inputs))
            for (i, j), tile_features in zip(chunk, features, strict=True):
                owned_rows, owned_columns = self._owned[0][i], self._owned[1][j]
                grid[owned_rows, owned_columns] = tile_features[
                    owned_rows.start - rows[i] : owned_rows.stop - rows[i],
                    owned_columns.start - columns[j] : owned_columns.stop - columns[j],
                ]


def with_tiling(extractor: FeatureExtractor, tiling: Tiling | None) -> FeatureExtractor:
    """`extractor` as a product of this tiling runs it: unchanged without one."""
    if tiling is None:
        return extractor
    if isinstance(extractor, TiledExtractor):
        if extractor.tiling == tiling:
            return extractor
        extractor = extractor.inner
    return TiledExtractor(extractor, tiling)


def tiling_of(extractor: FeatureExtractor) -> Tiling | None:
    """The tiling an extractor runs with (None: whole frames resized to the input)."""
    return extractor.tiling if isinstance(extractor, TiledExtractor) else None
