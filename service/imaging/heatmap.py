"""Error heatmaps: an L1 error map in the inferno colormap, black = 0, yellow-white = the map's maximum."""

from __future__ import annotations

import numpy as np

from service.imaging.codec import base64_text, png_of_uint8

# The "inferno" colormap sampled at 17 points (from matplotlib, which is not imported here); interpolated to a
# 256-entry lookup table once at import. Perceptually uniform and readable in grayscale print.
_INFERNO_POINTS = np.array(
    [
        [0, 0, 4], [11, 7, 36], [33, 12, 74], [61, 9, 101], [87, 16, 110], [113, 25, 110], [138, 34, 106],
        [163, 44, 97], [188, 55, 84], [210, 70, 68], [228, 90, 49], [241, 115, 29], [249, 142, 9],
        [252, 172, 17], [249, 203, 53], [242, 234, 105], [252, 255, 164],
    ],
    dtype=np.float64,
)


def _build_lut(points: np.ndarray) -> np.ndarray:
    """A 256×3 uint8 colour lookup table linearly interpolated between evenly spaced control points."""
    positions = np.linspace(0.0, 1.0, len(points))
    levels = np.linspace(0.0, 1.0, 256)
    channels = [np.interp(levels, positions, points[:, channel]) for channel in range(3)]
    lut: np.ndarray = np.rint(np.stack(channels, axis=1)).astype(np.uint8)
    return lut


HEATMAP_LUT = _build_lut(_INFERNO_POINTS)


def heatmap_indices(error_maps: np.ndarray, maxima: np.ndarray) -> np.ndarray:
    """Colormap indices (N, H, W) uint8 of error maps (N, H, W): 0 → 0, each map's maximum → 255, rounded."""
    maxima = np.asarray(maxima, dtype=np.float64)
    # The scale in float64, then float32: the same numbers for a batch as for one map with a Python-float scale.
    scale = np.divide(255.0, maxima, out=np.zeros_like(maxima), where=maxima > 0).astype(np.float32)
    indices = np.multiply(error_maps, scale[:, None, None], dtype=np.float32)
    np.minimum(indices, 255, out=indices)  # error maps are >= 0: only the top needs clipping
    indices += 0.5
    rounded: np.ndarray = indices.astype(np.uint8)
    return rounded


def heatmap_colors(indices: np.ndarray) -> np.ndarray:
    """RGB uint8 (..., 3) of colormap indices (...): ndarray.take, ~3x faster than fancy indexing on small maps."""
    return HEATMAP_LUT.take(indices, axis=0)


def heatmap_png_of_indices(indices: np.ndarray) -> bytes:
    """The RGB PNG of one map's colormap indices (H, W)."""
    return png_of_uint8(heatmap_colors(indices))


def heatmap_png(error_map: np.ndarray, vmax: float | None = None) -> bytes:
    """The heatmap PNG of an H×W error map; 0 is black, `vmax` (default: the map's max) white-yellow."""
    top = float(np.maximum.reduce(error_map, axis=None)) if vmax is None else float(vmax)
    return heatmap_png_of_indices(heatmap_indices(error_map[None], np.array([top]))[0])


def heatmap_pngs_base64(error_maps: np.ndarray, maxima: np.ndarray) -> list[str]:
    """base64 heatmap PNGs of a batch of error maps, each scaled to its own maximum."""
    return [base64_text(png_of_uint8(colors)) for colors in heatmap_colors(heatmap_indices(error_maps, maxima))]
