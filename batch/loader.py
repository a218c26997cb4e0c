"""Decode and preprocess upcoming images in threads while the current batch is scored.

Pillow's decoders and resize release the GIL, so two threads keep the next batch ready and
the job runs at close to the predictor's own speed (benchmarks/batch_benchmark.py).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from detector.images import InvalidImageError, read_image


@dataclass
class LoadedImage:
    relative_path: str
    image: Image.Image | None = None
    prepared: np.ndarray | None = None
    error: str | None = None


def _load(
    root: Path, relative: str, prepare: Callable[[Image.Image], np.ndarray] | None
) -> LoadedImage:
    try:
        image = read_image(root / relative)
        return LoadedImage(relative, image, prepare(image) if prepare else None)
    except InvalidImageError as error:
        return LoadedImage(relative, error=error.message)
    except Exception as error:  # a bad file must never stop the job
        return LoadedImage(relative, error=f"{type(error).__name__}: {error}")


def prefetch(
    root: Path,
    relative_paths: list[str],
    prepare: Callable[[Image.Image], np.ndarray] | None,
    workers: int = 2,
    lookahead: int = 16,
) -> Iterator[LoadedImage]:
    """Yield loaded images in input order, keeping up to `lookahead` in flight."""
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="prefetch") as pool:
        pending: deque[Future[LoadedImage]] = deque()
        paths = iter(relative_paths)
        for relative in paths:
            pending.append(pool.submit(_load, root, relative, prepare))
            if len(pending) >= lookahead:
                break
        while pending:
            loaded = pending.popleft().result()
            next_path = next(paths, None)
            if next_path is not None:
                pending.append(pool.submit(_load, root, next_path, prepare))
            yield loaded
