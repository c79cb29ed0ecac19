"""L1 error maps |reference − output| and their statistics (mean, max, p99), vectorized over a batch.

The inference engine computes them once per micro-batch (one set of numpy calls for 32 images instead of 32 sets),
on the event loop for a small batch and in its worker thread for a large one; the /reconstruct route uses the same
functions for the maps against clean references.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

#: The percentile reported next to the mean and the max.
ERROR_PERCENTILE = 99.0


def l1_error_maps(reference: np.ndarray, outputs: np.ndarray) -> np.ndarray:
    """|reference − outputs| averaged over channels: (N, H, W) from (N, H, W, C)."""
    difference = np.abs(reference - outputs)
    maps: np.ndarray = difference[..., 0] if difference.shape[-1] == 1 else difference.mean(axis=-1)
    return maps  # the mean of one channel is the channel (skips a reduction)


@functools.lru_cache(maxsize=64)
def _percentile_position(length: int, percent: float) -> tuple[int, float]:
    """(index of the lower order statistic, interpolation weight) of np.percentile's linear method."""
    position = percent / 100.0 * (length - 1)
    low = int(math.floor(position))
    return low, position - low


def max_and_percentile_rows(flat: np.ndarray, percent: float) -> tuple[np.ndarray, np.ndarray]:
    """Per row: the max and np.percentile(row, percent) (linear interpolation), from one partition.

    One partition at the lower order statistic puts every larger value after it, so the next order statistic and
    the max are reductions over that short tail: ~20x faster than np.percentile on small rows.
    """
    low, weight = _percentile_position(flat.shape[1], percent)
    parted = flat.copy()
    parted.partition(low, axis=1)  # one kth: several times faster than partitioning at [low, high]
    lower = parted[:, low]
    tail = parted[:, low:]
    top = np.maximum.reduce(tail, axis=1)
    if low == flat.shape[1] - 1:
        return top, lower
    upper = np.minimum.reduce(tail[:, 1:], axis=1)
    return top, lower + (upper - lower) * np.float32(weight)


@dataclass(slots=True)  # per request: plain slots (a frozen dataclass sets each field via object.__setattr__)
class ErrorMaps:
    """Error maps (N, H, W) and, per map, its mean, max and ERROR_PERCENTILE percentile (N,)."""

    maps: np.ndarray
    means: np.ndarray
    maxima: np.ndarray
    p99s: np.ndarray

    @classmethod
    def of(cls, maps: np.ndarray) -> ErrorMaps:
        """The statistics of `maps`, computed for all maps at once."""
        flat = maps.reshape(len(maps), -1)
        # ufunc reductions directly: the same sums as ndarray.mean without its Python wrapper (~5 µs a call).
        means = np.add.reduce(flat, axis=1) / np.float32(flat.shape[1])
        maxima, p99s = max_and_percentile_rows(flat, ERROR_PERCENTILE)
        return cls(maps, means, maxima, p99s)

    @classmethod
    def between(cls, reference: np.ndarray, outputs: np.ndarray) -> ErrorMaps:
        """The L1 error maps of (N, H, W, C) outputs against their references, with statistics."""
        return cls.of(l1_error_maps(reference, outputs))

    def rows(self, start: int, stop: int) -> ErrorMaps:
        """Maps start..stop (views)."""
        return ErrorMaps(self.maps[start:stop], self.means[start:stop], self.maxima[start:stop], self.p99s[start:stop])

    def stats(self) -> list[dict[str, float]]:
        """Per map: {"mean", "max", "p99"} as Python floats (the response's error_stats)."""
        columns = (self.means.tolist(), self.maxima.tolist(), self.p99s.tolist())
        return [{"mean": mean, "max": top, "p99": p99} for mean, top, p99 in zip(*columns, strict=True)]
