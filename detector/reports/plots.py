"""Pictures people look at: heatmap overlays, ROC curves, overlay grids, score histograms.

Heatmap colours are scaled by the calibrated threshold (threshold = middle of the colour
scale), so the same colour means the same thing on every image and every service replica.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image


@functools.cache
def color_table() -> np.ndarray:
    """matplotlib's "jet" as a 256-entry uint8 table: colouring a map is one index per pixel
    (a float RGBA colormap over a 4 MP map allocated ~230 MB). Made on first use, so a
    server that draws no heatmap, and its start, skip matplotlib's import."""
    import matplotlib

    jet = matplotlib.colormaps["jet"]
    return (jet(np.linspace(0.0, 1.0, 256))[:, :3] * 255 + 0.5).astype(np.uint8)


def pyplot() -> Any:
    """matplotlib's pyplot on the file-only Agg backend, imported when a figure is drawn:
    the service and the batch job colour heatmaps without paying its import (~0.4 s)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    return plt


def heatmap_colors(anomaly_map: np.ndarray, threshold: float) -> np.ndarray:
    """(H, W, 3) uint8 colours of a map; 0 -> blue, threshold -> green, 2 x threshold -> red."""
    scale = 2.0 * threshold if threshold > 0 else max(float(np.nanmax(anomaly_map)), 1e-12)
    levels = np.asarray(anomaly_map, dtype=np.float32) * np.float32(255.0 / scale)
    np.nan_to_num(levels, copy=False, nan=255.0)  # not a number: as anomalous as it gets
    np.clip(levels, 0.0, 255.0, out=levels)
    return color_table()[levels.astype(np.uint8)]


def overlay(
    image: Image.Image, anomaly_map: np.ndarray, threshold: float, alpha: float = 0.45
) -> Image.Image:
    """The image with its anomaly map blended on top, at the map's size (a capped map
    shrinks the image rather than stretching the map)."""
    colours = Image.fromarray(heatmap_colors(anomaly_map, threshold))
    base = image.convert("RGB")
    if base.size != colours.size:
        base = base.resize(colours.size, Image.Resampling.BILINEAR)
    return Image.blend(base, colours, alpha)


def map_to_png_image(anomaly_map: np.ndarray, threshold: float) -> Image.Image:
    """A 16-bit grayscale image of the raw map: value / (2 x threshold) scaled to 0..65535."""
    scale = 2.0 * threshold if threshold > 0 else max(float(anomaly_map.max()), 1e-12)
    levels = np.clip(anomaly_map / scale, 0.0, 1.0) * 65535.0 + 0.5
    return Image.fromarray(levels.astype(np.uint16))


def save_roc_curve(labels: np.ndarray, scores: np.ndarray, path: Path, title: str) -> Path:
    from sklearn.metrics import RocCurveDisplay

    plt = pyplot()
    figure, axes = plt.subplots(figsize=(4.5, 4.5))
    RocCurveDisplay.from_predictions(labels, scores, ax=axes, name="image score")
    axes.plot([0, 1], [0, 1], linestyle=":", color="grey")
    axes.set_title(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def save_overlay_grid(
    images: Sequence[Image.Image],
    maps: Sequence[np.ndarray],
    masks: Sequence[np.ndarray | None],
    titles: Sequence[str],
    threshold: float,
    path: Path,
    columns: int = 6,
) -> Path:
    """Test images with heatmap overlays and ground-truth outlines (white contours)."""
    rows = max(1, int(np.ceil(len(images) / columns)))
    plt = pyplot()
    figure, axes = plt.subplots(rows, columns, figsize=(2.4 * columns, 2.6 * rows), squeeze=False)
    for axis in axes.ravel():
        axis.axis("off")
    for axis, image, amap, mask, title in zip(
        axes.ravel(), images, maps, masks, titles, strict=False
    ):
        axis.imshow(overlay(image, amap, threshold))
        if mask is not None and mask.any():
            axis.contour(mask.astype(float), levels=[0.5], colors="white", linewidths=1.0)
        axis.set_title(title, fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def save_score_histogram(scores: Sequence[float], threshold: float, path: Path) -> Path:
    plt = pyplot()
    figure, axes = plt.subplots(figsize=(6, 3.5))
    axes.hist(scores, bins=min(50, max(5, len(scores) // 4)), color="#4878a8")
    axes.axvline(threshold, color="#c03030", linestyle="--", label=f"threshold {threshold:.4f}")
    axes.set_xlabel("anomaly score")
    axes.set_ylabel("images")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def save_severity_plot(
    curves: dict[str, list[tuple[int, float | None]]], metric: str, path: Path
) -> Path:
    """One line per shift: `metric` against severity (0 = the unshifted test set)."""
    plt = pyplot()
    figure, axes = plt.subplots(figsize=(7, 4))
    for name, points in curves.items():
        kept = [(severity, value) for severity, value in points if value is not None]
        if kept:
            axes.plot(*zip(*kept, strict=True), marker="o", label=name)
    axes.set_xlabel("severity (0 = unshifted)")
    axes.set_ylabel(metric.replace("_", " "))
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8, ncol=2)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
