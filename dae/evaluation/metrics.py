"""Image-quality metrics and the sparsity report of a trained model.

Metrics are computed per image and averaged over images; images are float (N, H, W, C) in [0, 1] and every
metric uses data_range = 1:
- PSNR in dB, 10·log10(1 / MSE), capped at 100 dB per image (a perfect reconstruction would be +inf, which JSON
  cannot hold).
- SSIM: skimage.metrics.structural_similarity with its defaults (7x7 uniform window, K1=0.01, K2=0.03, sample
  covariance, mean over the window-valid interior, channels averaged), image by image. Images smaller than 7 pixels
  use the largest odd window that fits.
- mean L1 |x − y| and MSE (x − y)².

TensorFlow-free except sparsity_report, which takes a Keras model (keras is imported there only).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray
from skimage.metrics import structural_similarity

from dae.spec import LayerSparsity, SparsityReport

# Imported with the module (as scipy.ndimage was before), so the first scored request does not pay for scipy's import.
_structural_similarity: Callable[..., float] = structural_similarity  # skimage ships no annotations

PSNR_CAP_DB = 100.0
NEAR_ZERO = 1e-6
SSIM_WINDOW = 7

Batch = NDArray[np.float64]


def as_batch(images: ArrayLike, name: str) -> Batch:
    """`images` as a float64 (N, H, W, C) batch ((N, H, W) grayscale gets a channel axis); ValueError otherwise."""
    array = np.asarray(images, dtype=np.float64)
    if array.ndim == 3:  # (N, H, W) grayscale
        array = array[..., np.newaxis]
    if array.ndim != 4:
        raise ValueError(f"Expected {name} as (N, H, W, C) or (N, H, W). Received: {name}.shape={np.shape(images)}")
    return array


def _pair(clean: ArrayLike, estimate: ArrayLike) -> tuple[Batch, Batch]:
    clean_batch, estimate_batch = as_batch(clean, "clean"), as_batch(estimate, "estimate")
    if clean_batch.shape != estimate_batch.shape:
        raise ValueError(
            f"Expected clean and estimate of the same shape. Received: clean.shape={np.shape(clean)}, "
            f"estimate.shape={np.shape(estimate)}"
        )
    return clean_batch, estimate_batch


def mse_per_image(clean: ArrayLike, estimate: ArrayLike) -> NDArray[np.float64]:
    """Mean squared error of each image, shape (N,)."""
    clean_batch, estimate_batch = _pair(clean, estimate)
    return np.asarray(np.mean((clean_batch - estimate_batch) ** 2, axis=(1, 2, 3)), dtype=np.float64)


def l1_per_image(clean: ArrayLike, estimate: ArrayLike) -> NDArray[np.float64]:
    """Mean absolute error of each image, shape (N,)."""
    clean_batch, estimate_batch = _pair(clean, estimate)
    return np.asarray(np.mean(np.abs(clean_batch - estimate_batch), axis=(1, 2, 3)), dtype=np.float64)


def psnr_per_image(clean: ArrayLike, estimate: ArrayLike) -> NDArray[np.float64]:
    """PSNR (dB, data_range 1) of each image, shape (N,), capped at PSNR_CAP_DB."""
    return _psnr_from_mse(mse_per_image(clean, estimate))


def _psnr_from_mse(errors: NDArray[np.float64]) -> NDArray[np.float64]:
    with np.errstate(divide="ignore"):
        values = 10.0 * np.log10(1.0 / errors)
    return np.minimum(values, PSNR_CAP_DB)


def ssim_window(height: int, width: int) -> int:
    """The SSIM window side for images of this size: 7, or the largest odd side that fits (at least 3)."""
    side = min(SSIM_WINDOW, height, width)
    window = side if side % 2 == 1 else side - 1
    if window < 3:
        raise ValueError(
            f"SSIM needs images of at least 3x3 pixels. Expected height, width >= 3. Received: {height}x{width}"
        )
    return window


def ssim_per_image(clean: ArrayLike, estimate: ArrayLike) -> NDArray[np.float64]:
    """SSIM (data_range 1) of each image, shape (N,): skimage.metrics.structural_similarity, channels averaged."""

    clean_batch, estimate_batch = _pair(clean, estimate)
    window = ssim_window(clean_batch.shape[1], clean_batch.shape[2])
    return np.array(
        [
            float(_structural_similarity(x, y, win_size=window, data_range=1.0, channel_axis=-1))
            for x, y in zip(clean_batch, estimate_batch, strict=True)
        ],
        dtype=np.float64,
    )


def image_quality(clean: ArrayLike, estimate: ArrayLike) -> dict[str, float]:
    """{"psnr", "ssim", "l1", "mse"} of `estimate` against `clean`, each averaged over images."""
    clean_batch, estimate_batch = _pair(clean, estimate)  # float64 once, shared by the four metrics
    squared_errors = mse_per_image(clean_batch, estimate_batch)
    return {
        "psnr": float(np.mean(_psnr_from_mse(squared_errors))),
        "ssim": float(np.mean(ssim_per_image(clean_batch, estimate_batch))),
        "l1": float(np.mean(l1_per_image(clean_batch, estimate_batch))),
        "mse": float(np.mean(squared_errors)),
    }


# ---------------------------------------------------------------------------------------------
# Sparsity of a Keras model
# ---------------------------------------------------------------------------------------------


def layer_sparsity(name: str, kernel: ArrayLike) -> LayerSparsity:
    """Sparsity figures of one kernel."""
    values = np.asarray(kernel, dtype=np.float64).ravel()
    return LayerSparsity(
        layer=name,
        weights=int(values.size),
        zero_fraction=float(np.mean(values == 0.0)) if values.size else 0.0,
        near_zero_fraction=float(np.mean(np.abs(values) < NEAR_ZERO)) if values.size else 0.0,
        l1_norm=float(np.sum(np.abs(values))),
        l2_norm=float(np.sqrt(np.sum(values * values))),
    )


def _layers_with_kernels(model: Any) -> list[Any]:
    found = []
    for layer in model.layers:
        if hasattr(layer, "layers") and getattr(layer, "layers", None):  # a nested model
            found.extend(_layers_with_kernels(layer))
        elif getattr(layer, "kernel", None) is not None:
            found.append(layer)
    return found


def sparsity_report(
    model: Any, test_images: NDArray[Any], *, max_images: int = 256, batch_size: int = 256
) -> SparsityReport:
    """Per-layer kernel sparsity and the mean fraction of exactly-zero activations of the layer named `code`."""
    import keras  # noqa: PLC0415 - only the worker (which trains) computes sparsity

    layers = [
        layer_sparsity(layer.name, keras.ops.convert_to_numpy(layer.kernel)) for layer in _layers_with_kernels(model)
    ]
    try:
        code_layer = model.get_layer("code")
    except ValueError:
        raise ValueError(
            f"The sparsity report needs the encoder output layer. Expected a layer named 'code'. "
            f"Received: layers={[layer.name for layer in model.layers]}"
        ) from None
    encoder = keras.Model(model.inputs[0], code_layer.output)  # a single input: no structure warning
    images = np.asarray(test_images[:max_images], dtype=np.float32)
    zeros = 0
    total = 0
    for start in range(0, len(images), batch_size):
        codes = keras.ops.convert_to_numpy(encoder(images[start : start + batch_size], training=False))
        zeros += int(np.count_nonzero(codes == 0.0))
        total += codes.size
    return SparsityReport(layers=layers, code_zero_fraction=float(zeros / total) if total else 0.0)
