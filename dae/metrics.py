"""Image-quality metrics, the evaluation table of a trained denoiser, and the sparsity report.

Metrics are computed per image and averaged over images; images are float (N, H, W, C) in [0, 1] and every
metric uses data_range = 1:
- PSNR in dB, 10·log10(1 / MSE), capped at 100 dB per image (a perfect reconstruction would be +inf, which JSON
  cannot hold).
- SSIM exactly as skimage.metrics.structural_similarity with its defaults (7x7 uniform window, K1=0.01, K2=0.03,
  sample covariance, reflect padding, mean over the window-valid interior, channels averaged), vectorized over the
  batch so the evaluation in every job stays fast. Images smaller than 7 pixels use the largest odd window that fits.
- mean L1 |x − y| and MSE (x − y)².

The evaluation table (evaluate_denoiser) runs on the held-out test split: at most 512 images (a seeded subset; fewer
for large images, at most 512·32·32 pixels) for the `noisy` input and the `model` output (clipped to [0, 1]);
the classical baselines run on the first images of that subset: `tv` (denoise_tv_chambolle, weight 0.6·σ̂) on at
most 128 and `nl_means` (denoise_nl_means, fast mode, 5x5 patches, distance 6, h = 0.8·σ̂, sigma = σ̂) on at most
64 images, per noise setting. σ̂ is estimated from each noisy image (MAD of the finest diagonal Haar wavelet
coefficients / 0.6745, the estimator of skimage's estimate_sigma, which needs PyWavelets, not installed here);
the constants were tuned on Fashion-MNIST and reproduce the reference figures of DESIGN.md §5. Each QualityRow
records how many images it averages over. Noise settings: the training noise, then gaussian 0.1/0.2/0.3/0.5
(clipped), without duplicates. The `noisy`, `tv` and `nl_means` rows do not depend on the model (reference_rows):
a worker computes them in a helper process while it exports the model (dae.reference); the numbers are the same.

TensorFlow-free except sparsity_report and keras_predictor, which take a Keras model.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from scipy import ndimage

from dae.noise import add_noise
from dae.spec import LayerSparsity, NoiseSpec, QualityRow, SparsityReport

logger = logging.getLogger(__name__)

PSNR_CAP_DB = 100.0
STANDARD_SWEEP_LEVELS = (0.1, 0.2, 0.3, 0.5)
MAX_EVAL_IMAGES = 512
MAX_EVAL_PIXELS = 512 * 32 * 32
MAX_TV_IMAGES = 128
MAX_NL_MEANS_IMAGES = 64
TV_WEIGHT_PER_SIGMA = 0.6
NL_MEANS_H_PER_SIGMA = 0.8
NEAR_ZERO = 1e-6

_SSIM_K1, _SSIM_K2, _SSIM_WINDOW = 0.01, 0.03, 7

Predictor = Callable[[np.ndarray], np.ndarray]


def _as_batch(images: np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(images, dtype=np.float64)
    if array.ndim == 3:  # (N, H, W) grayscale
        array = array[..., np.newaxis]
    if array.ndim != 4:
        raise ValueError(f"Expected {name} as (N, H, W, C) or (N, H, W). Received: {name}.shape={np.shape(images)}")
    return array


def _pair(clean: np.ndarray, estimate: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    clean_batch, estimate_batch = _as_batch(clean, "clean"), _as_batch(estimate, "estimate")
    if clean_batch.shape != estimate_batch.shape:
        raise ValueError(
            f"Expected clean and estimate of the same shape. Received: clean.shape={np.shape(clean)}, "
            f"estimate.shape={np.shape(estimate)}"
        )
    return clean_batch, estimate_batch


def mse_per_image(clean: np.ndarray, estimate: np.ndarray) -> np.ndarray:
    """Mean squared error of each image, shape (N,)."""
    clean_batch, estimate_batch = _pair(clean, estimate)
    return np.mean((clean_batch - estimate_batch) ** 2, axis=(1, 2, 3))


def l1_per_image(clean: np.ndarray, estimate: np.ndarray) -> np.ndarray:
    """Mean absolute error of each image, shape (N,)."""
    clean_batch, estimate_batch = _pair(clean, estimate)
    return np.mean(np.abs(clean_batch - estimate_batch), axis=(1, 2, 3))


def psnr_per_image(clean: np.ndarray, estimate: np.ndarray) -> np.ndarray:
    """PSNR (dB, data_range 1) of each image, shape (N,), capped at PSNR_CAP_DB."""
    return _psnr_from_mse(mse_per_image(clean, estimate))


def _psnr_from_mse(errors: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        values = 10.0 * np.log10(1.0 / errors)
    return np.minimum(values, PSNR_CAP_DB)


def _ssim_window(height: int, width: int) -> int:
    side = min(_SSIM_WINDOW, height, width)
    window = side if side % 2 == 1 else side - 1
    if window < 3:
        raise ValueError(
            f"SSIM needs images of at least 3x3 pixels. Expected height, width >= 3. Received: {height}x{width}"
        )
    return window


def ssim_per_image(clean: np.ndarray, estimate: np.ndarray) -> np.ndarray:
    """SSIM (data_range 1) of each image, shape (N,): skimage's structural_similarity, vectorized."""
    clean_batch, estimate_batch = _pair(clean, estimate)
    window = _ssim_window(clean_batch.shape[1], clean_batch.shape[2])
    size = (1, window, window, 1)  # filter H and W only: each image and channel on its own
    pad = (window - 1) // 2
    # Only the window-valid interior is averaged: crop the local statistics before the element-wise algebra
    # (the same numbers as computing the whole map and cropping it, with ~40% less arithmetic on 28x28 images).
    interior = (slice(None), slice(pad, clean_batch.shape[1] - pad), slice(pad, clean_batch.shape[2] - pad))

    def local_mean(values: np.ndarray) -> np.ndarray:
        return ndimage.uniform_filter(values, size=size, mode="reflect")[interior]

    points = window * window
    covariance_norm = points / (points - 1.0)
    mean_x, mean_y = local_mean(clean_batch), local_mean(estimate_batch)
    var_x = covariance_norm * (local_mean(clean_batch * clean_batch) - mean_x * mean_x)
    var_y = covariance_norm * (local_mean(estimate_batch * estimate_batch) - mean_y * mean_y)
    cov_xy = covariance_norm * (local_mean(clean_batch * estimate_batch) - mean_x * mean_y)
    c1, c2 = _SSIM_K1**2, _SSIM_K2**2
    ssim_map = ((2 * mean_x * mean_y + c1) * (2 * cov_xy + c2)) / ((mean_x**2 + mean_y**2 + c1) * (var_x + var_y + c2))
    return ssim_map.mean(axis=(1, 2)).mean(axis=1)


def image_quality(clean: np.ndarray, estimate: np.ndarray) -> dict[str, float]:
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
# Classical baselines
# ---------------------------------------------------------------------------------------------


def estimate_noise_sigma(image: np.ndarray) -> float:
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


def estimate_noise_sigmas(images: np.ndarray) -> np.ndarray:
    """estimate_noise_sigma of every image of an (N, H, W, C) batch at once (the same numbers, vectorized)."""
    array = np.asarray(images, dtype=np.float64)
    count, height, width, channels = array.shape
    if height < 2 or width < 2:
        raise ValueError(f"Expected images of at least 2x2 pixels. Received: shape={array.shape}")
    cropped = array[:, : height // 2 * 2, : width // 2 * 2]
    diagonal = (cropped[:, 0::2, 0::2] - cropped[:, 0::2, 1::2] - cropped[:, 1::2, 0::2] + cropped[:, 1::2, 1::2]) / 2.0
    per_channel = np.median(np.abs(diagonal.reshape(count, -1, channels)), axis=1) / 0.6745
    return per_channel.mean(axis=-1)


def denoise_tv_batch(noisy: np.ndarray) -> np.ndarray:
    """Total-variation denoising (Chambolle) of each image, weight = TV_WEIGHT_PER_SIGMA · σ̂.

    The algorithm and stopping rule of skimage.restoration.denoise_tv_chambolle (defaults: eps 2e-4, at most 200
    iterations; each channel on its own), run on the whole batch at once: every image keeps its own weight and stops
    at its own iteration, so the result is that of denoising the images one by one with skimage (measured on 128
    Fashion-MNIST images at σ 0.1-0.5: at most 1.2e-7 apart, float32 summation order) in a third of the time on
    small images, where the per-call overhead of a loop over images dominates.
    """
    batch = _as_batch(noisy, "noisy")
    count, height, width, channels = batch.shape
    weights = [max(TV_WEIGHT_PER_SIGMA * float(sigma), 1e-4) for sigma in estimate_noise_sigmas(batch)]
    # One 2-D problem per (image, channel), with the image's weight.
    planes = np.ascontiguousarray(np.moveaxis(batch, -1, 1).reshape(count * channels, height, width))
    denoised = _tv_chambolle_planes(planes, np.repeat(np.asarray(weights, dtype=np.float64), channels))
    denoised = np.moveaxis(denoised.reshape(count, channels, height, width), 1, -1)
    return np.clip(denoised, 0.0, 1.0).astype(np.float32)


def _tv_chambolle_planes(
    planes: np.ndarray, weights: np.ndarray, eps: float = 2.0e-4, max_iterations: int = 200
) -> np.ndarray:
    """skimage's _denoise_tv_chambolle_nd for a stack of 2-D planes (B, H, W), each with its weight and its own stop.

    Same operations in the same dtype (a Python-float weight meets float32 arrays as float32), so each plane's result
    is skimage's on that plane alone up to the order of float32 sums.
    """
    images = planes
    dtype = images.dtype
    weight = np.asarray(weights, dtype=dtype)
    tau = 1.0 / (2.0 * 2)  # 1 / (2 · ndim), ndim = 2
    step = (tau / np.asarray(weights, dtype=np.float64)).astype(dtype)[:, None, None]
    p = np.zeros((2, *images.shape), dtype=dtype)
    g = np.zeros_like(p)
    d = np.zeros_like(images)
    out = images
    result = np.empty_like(images)
    done = np.zeros(len(images), dtype=bool)
    energy_initial = energy_previous = None
    for iteration in range(max_iterations):
        if iteration > 0:
            d = -p.sum(0)  # the (negative) divergence of p
            d[:, 1:, :] += p[0, :, :-1, :]
            d[:, :, 1:] += p[1, :, :, :-1]
            out = images + d
        energy = (d**2).sum(axis=(1, 2))
        g[0, :, :-1, :] = np.diff(out, axis=1)
        g[1, :, :, :-1] = np.diff(out, axis=2)
        norm = np.sqrt((g**2).sum(axis=0))
        energy += weight * norm.sum(axis=(1, 2))
        norm *= step
        norm += 1.0
        p -= tau * g
        p /= norm[np.newaxis]
        energy /= float(images[0].size)
        if iteration == 0:
            energy_initial = energy_previous = energy
            continue
        stopped = ~done & (np.abs(energy_previous - energy) < eps * energy_initial)
        result[stopped] = out[stopped]
        done |= stopped
        if done.all():
            return result
        energy_previous = energy
    result[~done] = out[~done]  # the iteration budget ran out: the last iterate, as skimage returns it
    return result


def denoise_nl_means_batch(noisy: np.ndarray) -> np.ndarray:
    """Non-local means (fast mode, 5x5 patches, search distance 6, h = NL_MEANS_H_PER_SIGMA · σ̂) of each image."""
    from skimage.restoration import denoise_nl_means  # noqa: PLC0415

    batch = _as_batch(noisy, "noisy")
    outputs = []
    for image, sigma in zip(batch, estimate_noise_sigmas(batch).tolist(), strict=True):
        channel_axis = -1 if image.shape[-1] > 1 else None
        source = image if channel_axis is not None else image[..., 0]
        denoised = denoise_nl_means(
            source,
            h=max(NL_MEANS_H_PER_SIGMA * sigma, 1e-4),
            sigma=sigma,
            fast_mode=True,
            patch_size=5,
            patch_distance=6,
            channel_axis=channel_axis,
        )
        outputs.append(denoised.reshape(image.shape))
    return np.clip(np.stack(outputs), 0.0, 1.0).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# The evaluation table
# ---------------------------------------------------------------------------------------------


def noise_label(noise: NoiseSpec) -> str:
    """A short name of a noise setting, e.g. `gaussian:0.3` (`:unclipped` appended when not clipped)."""
    label = f"{noise.type}:{noise.level:g}"
    return label if noise.clip else f"{label}:unclipped"


def evaluation_noises(training_noise: NoiseSpec) -> list[NoiseSpec]:
    """The training noise followed by the standard sweep (gaussian 0.1/0.2/0.3/0.5, clipped), no duplicates."""
    settings = [training_noise] + [
        NoiseSpec(type="gaussian", level=level, clip=True) for level in STANDARD_SWEEP_LEVELS
    ]
    unique: list[NoiseSpec] = []
    for setting in settings:
        if noise_label(setting) not in {noise_label(kept) for kept in unique}:
            unique.append(setting)
    return unique


def select_test_images(test_images: np.ndarray, seed: int, max_images: int = MAX_EVAL_IMAGES) -> np.ndarray:
    """The evaluation subset: at most `max_images` (and at most MAX_EVAL_PIXELS pixels) test images, seeded."""
    count = len(test_images)
    if count == 0:
        raise ValueError("Expected at least one test image. Received: 0 test images")
    height, width = test_images.shape[1], test_images.shape[2]
    limit = max(1, min(max_images, MAX_EVAL_PIXELS // max(1, height * width)))
    if count <= limit:
        return test_images
    chosen = np.sort(np.random.default_rng(seed).choice(count, size=limit, replace=False))
    return test_images[chosen]


def _row(noise: NoiseSpec, method: str, clean: np.ndarray, estimate: np.ndarray) -> QualityRow:
    return QualityRow(noise=noise_label(noise), method=method, images=len(clean), **image_quality(clean, estimate))


def reference_rows(
    test_images: np.ndarray,
    training_noise: NoiseSpec,
    *,
    seed: int = 0,
    max_images: int = MAX_EVAL_IMAGES,
    tv_images: int = MAX_TV_IMAGES,
    nl_means_images: int = MAX_NL_MEANS_IMAGES,
    baselines: bool = True,
) -> list[QualityRow]:
    """The rows of the evaluation table that do not depend on the model: for each noise setting `noisy`, then
    `tv` and `nl_means` (when `baselines`). evaluate_denoiser(reference=...) merges them with the model's rows, so
    they can be computed anywhere (dae.reference runs them in a helper process while the model is exported)."""
    clean = select_test_images(np.asarray(test_images, dtype=np.float32), seed, max_images)
    rows: list[QualityRow] = []
    for index, noise in enumerate(evaluation_noises(training_noise)):
        noisy = add_noise(clean, noise, seed=[seed, index])
        rows.append(_row(noise, "noisy", clean, noisy))
        if baselines:
            tv_count = min(tv_images, len(clean))
            rows.append(_row(noise, "tv", clean[:tv_count], denoise_tv_batch(noisy[:tv_count])))
            nl_count = min(nl_means_images, len(clean))
            rows.append(_row(noise, "nl_means", clean[:nl_count], denoise_nl_means_batch(noisy[:nl_count])))
    return rows


def evaluate_denoiser(
    predict: Predictor,
    test_images: np.ndarray,
    training_noise: NoiseSpec,
    *,
    seed: int = 0,
    max_images: int = MAX_EVAL_IMAGES,
    tv_images: int = MAX_TV_IMAGES,
    nl_means_images: int = MAX_NL_MEANS_IMAGES,
    baselines: bool = True,
    reference: Sequence[QualityRow] | Callable[[], Sequence[QualityRow]] | None = None,
) -> list[QualityRow]:
    """The evaluation table of a denoiser on held-out test images (see the module docstring).

    `predict(noisy)` maps a float32 (N, H, W, C) batch to denoised images of the same shape (Keras, ONNX, ...);
    its output is clipped to [0, 1]. Rows: for each noise setting, `noisy`, `model`, then `tv` and `nl_means`.
    `reference`: the model-independent rows as reference_rows returns them for the same arguments, or a function
    called for them once the model's rows are done (dae.reference); computed here when None.
    """
    clean = select_test_images(np.asarray(test_images, dtype=np.float32), seed, max_images)
    noises = evaluation_noises(training_noise)
    model_rows = []
    for index, noise in enumerate(noises):
        noisy = add_noise(clean, noise, seed=[seed, index])
        denoised = np.asarray(predict(noisy), dtype=np.float32)
        if denoised.shape != noisy.shape:
            raise ValueError(
                f"The denoiser must return images of its input's shape. Expected {noisy.shape}. "
                f"Received: {denoised.shape}"
            )
        if not np.isfinite(denoised).all():
            raise ValueError(
                "The denoiser returned NaN or infinite values. Expected finite pixels. Received: non-finite output"
            )
        model_rows.append(_row(noise, "model", clean, np.clip(denoised, 0.0, 1.0)))
    if reference is None:
        reference = reference_rows(
            clean,
            training_noise,
            seed=seed,
            max_images=max_images,
            tv_images=tv_images,
            nl_means_images=nl_means_images,
            baselines=baselines,
        )
    elif callable(reference):
        reference = reference()
    rows: list[QualityRow] = []
    for model_row, (noisy_row, *baseline_rows) in zip(
        model_rows, _rows_by_noise(reference, noises, len(clean)), strict=True
    ):
        rows.extend([noisy_row, model_row, *baseline_rows])
    return rows


def _rows_by_noise(reference: Sequence[QualityRow], noises: list[NoiseSpec], images: int) -> list[list[QualityRow]]:
    """The reference rows of each noise setting, in order; each group starts with its `noisy` row over `images`."""
    labels = [noise_label(noise) for noise in noises]
    groups: dict[str, list[QualityRow]] = {}
    for row in reference:
        groups.setdefault(row.noise, []).append(row)
    if list(groups) != labels or any(
        group[0].method != "noisy" or group[0].images != images for group in groups.values()
    ):
        raise ValueError(
            f"Expected reference rows (noisy first, over {images} images) for the noise settings {labels}. "
            f"Received: {[(row.noise, row.method, row.images) for row in reference]}"
        )
    return list(groups.values())


def format_evaluation(rows: Sequence[QualityRow]) -> str:
    """The evaluation table as aligned text (for the CLI and logs)."""
    lines = [f"{'noise':<22} {'method':<10} {'PSNR dB':>8} {'SSIM':>7} {'L1':>8} {'MSE':>9} {'images':>7}"]
    for row in rows:
        lines.append(
            f"{row.noise:<22} {row.method:<10} {row.psnr:8.2f} {row.ssim:7.4f} {row.l1:8.4f} {row.mse:9.5f} "
            f"{row.images if row.images is not None else '':>7}"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Keras models: prediction and sparsity
# ---------------------------------------------------------------------------------------------


def keras_predictor(model: Any, batch_size: int = 256) -> Predictor:
    """A `predict(images)` callable over a Keras model, in batches (predict_on_batch: no per-call overhead)."""

    def predict(images: np.ndarray) -> np.ndarray:
        batch = np.asarray(images, dtype=np.float32)
        outputs = [
            np.asarray(model.predict_on_batch(batch[start : start + batch_size]))
            for start in range(0, len(batch), batch_size)
        ]
        return np.concatenate(outputs).astype(np.float32, copy=False)

    return predict


def _layers_with_kernels(model: Any) -> list[Any]:
    found = []
    for layer in model.layers:
        if hasattr(layer, "layers") and getattr(layer, "layers", None):  # a nested model
            found.extend(_layers_with_kernels(layer))
        elif getattr(layer, "kernel", None) is not None:
            found.append(layer)
    return found


def layer_sparsity(name: str, kernel: np.ndarray) -> LayerSparsity:
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


def sparsity_report(
    model: Any, test_images: np.ndarray, *, max_images: int = 256, batch_size: int = 256
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
