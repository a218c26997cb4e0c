"""Rows too many to be sure of holding in memory: fitting keeps every training image's
features for the bank and each fold, and the coreset keeps every normalised row for its
greedy pass. In memory up to a budget, beyond it in a temporary file the page cache serves
(a numpy memory map), so a large fit is bounded by disk, not RAM.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator, Sequence
from typing import IO, Any

import numpy as np

# Above this many bytes the rows go to a temporary file.
DEFAULT_IN_MEMORY_BYTES = 512 << 20


class Spill:
    """A float32 array of `shape`, filled by the caller (`array[a:b] = rows`); a context
    manager that removes its file on exit."""

    def __init__(
        self,
        shape: tuple[int, ...],
        in_memory_bytes: int = DEFAULT_IN_MEMORY_BYTES,
        prefix: str = "spill-",
    ) -> None:
        self._file: IO[bytes] | None = None
        if int(np.prod(shape)) * 4 > in_memory_bytes:
            self._file = tempfile.TemporaryFile(prefix=prefix)  # noqa: SIM115 (closed on exit)
            self.array: Any = np.memmap(self._file, dtype=np.float32, mode="w+", shape=shape)
        else:
            self.array = np.empty(shape, dtype=np.float32)

    def __enter__(self) -> Spill:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._file is not None:
            self.array = None
            self._file.close()
            self._file = None

    def take(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """The rows at `indices`, in index order (a file is read front to back), in memory."""
        return np.asarray(self.array[np.sort(np.asarray(indices))], dtype=np.float32)

    def blocks(self, indices: Sequence[int] | np.ndarray, size: int) -> Iterator[np.ndarray]:
        """The rows at `indices`, `size` at a time: what `MemoryBank.fit_stream` reads."""
        indices = np.asarray(indices)
        for start in range(0, len(indices), size):
            yield self.take(indices[start : start + size])
