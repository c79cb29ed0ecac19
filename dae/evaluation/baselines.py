"""Classical denoisers, the baselines of the evaluation table, run through scikit-image (BM3D when installed).

- `tv`: skimage.restoration.denoise_tv_chambolle (defaults: eps 2e-4, at most 200 iterations; each channel on
  its own), weight = TV_WEIGHT_PER_SIGMA · σ̂.
- `nl_means`: skimage.restoration.denoise_nl_means (fast mode, 5x5 patches, search distance 6,
  h = NL_MEANS_H_PER_SIGMA · σ̂, sigma = σ̂).
- BM3D: the optional PyPI package `bm3d`, given the true σ (bench/quality.py); None when it is not installed.

σ̂ is estimated from each noisy image: the MAD of the finest diagonal Haar wavelet coefficients / 0.6745, the
estimator of skimage's estimate_sigma, which needs PyWavelets (not installed here). The constants were tuned on
Fashion-MNIST and reproduce the reference figures of DESIGN.md §7. Every denoiser returns float32 clipped to [0, 1].
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from dae.evaluation.metrics import as_batch

TV_WEIGHT_PER_SIGMA = 0.6
NL_MEANS_H_PER_SIGMA = 0.8
#: The smallest TV weight and NL-means h (an image without noise would get 0, which skimage refuses).
_MIN_STRENGTH = 1e-4


def estimate_noise_sigma(image: ArrayLike) -> float:
    """Blind estimate of the Gaussian noise stddev of one (H, W, C) image, averaged over channels.

    Donoho's estimator: median(|HH|) / 0.6745 over the finest diagonal Haar detail coefficients.
    """
    array = np.asarray(image, dtype=np.float64)
    if array.ndim == 2:
        array = array[..., np.newaxis]
    height, width = array.shape[0] // 2 * 2, array.shape[1] // 2 * 2
    if height < 2 or width < 2:
        raise ValueError(f"Expected an image of at least 2x2 pixels. Received: shape={np.shape(image)}")
    cropped = array[:height, :width]
    diagonal = (cropped[0::2, 0::2] - cropped[0::2, 1::2] - cropped[1::2, 0::2] + cropped[1::2, 1::2]) / 2.0
    per_channel = np.median(np.abs(diagonal.reshape(-1, array.shape[-1])), axis=0) / 0.6745
    return float(np.mean(per_channel))


def estimate_noise_sigmas(images: ArrayLike) -> NDArray[np.float64]:
    """estimate_noise_sigma of every image of an (N, H, W, C) batch at once (the same numbers, vectorized)."""
    array = np.asarray(images, dtype=np.float64)
    count, height, width, channels = array.shape
    if height < 2 or width < 2:
        raise ValueError(f"Expected images of at least 2x2 pixels. Received: shape={array.shape}")
    cropped = array[:, : height // 2 * 2, : width // 2 * 2]
    diagonal = (cropped[:, 0::2, 0::2] - cropped[:, 0::2, 1::2] - cropped[:, 1::2, 0::2] + cropped[:, 1::2, 1::2]) / 2.0
    per_channel = np.median(np.abs(diagonal.reshape(count, -1, channels)), axis=1) / 0.6745
    return np.asarray(per_channel.mean(axis=-1), dtype=np.float64)


def _channel_axis(image: NDArray[Any]) -> int | None:
    """skimage's channel_axis for one (H, W, C) image: -1 in colour, None (a 2-D image) in grayscale."""
    return -1 if image.shape[-1] > 1 else None


def _plane(image: NDArray[Any]) -> NDArray[Any]:
    return image if _channel_axis(image) is not None else image[..., 0]


def denoise_tv_batch(noisy: ArrayLike) -> NDArray[np.float32]:
    """Total-variation denoising (Chambolle, skimage) of each image, weight = TV_WEIGHT_PER_SIGMA · σ̂."""
    from skimage.restoration import denoise_tv_chambolle  # noqa: PLC0415 - skimage's import is slow

    tv_chambolle: Callable[..., NDArray[Any]] = denoise_tv_chambolle  # skimage ships no annotations

    batch = as_batch(noisy, "noisy")
    outputs = [
        np.asarray(
            tv_chambolle(
                _plane(image),
                weight=max(TV_WEIGHT_PER_SIGMA * sigma, _MIN_STRENGTH),
                channel_axis=_channel_axis(image),
            )
        ).reshape(image.shape)
        for image, sigma in zip(batch, estimate_noise_sigmas(batch).tolist(), strict=True)
    ]
    return np.asarray(np.clip(np.stack(outputs), 0.0, 1.0), dtype=np.float32)


def denoise_nl_means_batch(noisy: ArrayLike) -> NDArray[np.float32]:
    """Non-local means (fast mode, 5x5 patches, search distance 6, h = NL_MEANS_H_PER_SIGMA · σ̂) of each image."""
    from skimage.restoration import denoise_nl_means  # noqa: PLC0415 - skimage's import is slow

    batch = as_batch(noisy, "noisy")
    outputs = [
        np.asarray(
            denoise_nl_means(
                _plane(image),
                h=max(NL_MEANS_H_PER_SIGMA * sigma, _MIN_STRENGTH),
                sigma=sigma,
                fast_mode=True,
                patch_size=5,
                patch_distance=6,
                channel_axis=_channel_axis(image),
            )
        ).reshape(image.shape)
        for image, sigma in zip(batch, estimate_noise_sigmas(batch).tolist(), strict=True)
    ]
    return np.asarray(np.clip(np.stack(outputs), 0.0, 1.0), dtype=np.float32)


def denoise_bm3d_batch(noisy: ArrayLike, sigma: float) -> NDArray[np.float32] | None:
    """BM3D of each grayscale image with the true σ, or None when the optional `bm3d` package is missing."""
    try:
        import bm3d  # noqa: PLC0415 - optional, and slow to import
    except ImportError:
        return None
    batch = np.asarray(noisy)  # as given: bm3d picks its own float type
    outputs = [np.asarray(bm3d.bm3d(image[..., 0], sigma_psd=sigma), dtype=np.float32) for image in batch]
    return np.clip(np.stack(outputs)[..., np.newaxis], 0.0, 1.0).astype(np.float32)
