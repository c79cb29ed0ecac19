"""The evaluation table of a trained denoiser (the model card's quality rows) and its text form.

The table runs on the held-out test split: at most 512 images (a seeded subset; fewer for large images, at most
512·32·32 pixels) for the `noisy` input and the `model` output (clipped to [0, 1]); the classical baselines
(dae.evaluation.baselines) run on the first images of that subset: `tv` on at most 128 and `nl_means` on at most 64
images, per noise setting. Each QualityRow records how many images it averages over. Noise settings: the training
noise (for a blind model's range [min, max]: its type at min, mid and max and at the standard levels inside the range,
ascending), then gaussian 0.1/0.2/0.3/0.5 (clipped), without duplicates. The `noisy`, `tv` and `nl_means` rows do not
depend on the model (reference_rows): a worker computes them in a helper process while it exports the model
(dae.evaluation.helper); the numbers are the same.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

from dae.evaluation.baselines import denoise_nl_means_batch, denoise_tv_batch
from dae.evaluation.metrics import image_quality
from dae.noise import add_noise
from dae.spec import NoiseSpec, QualityRow

STANDARD_SWEEP_LEVELS = (0.1, 0.2, 0.3, 0.5)
MAX_EVAL_IMAGES = 512
MAX_EVAL_PIXELS = 512 * 32 * 32
MAX_TV_IMAGES = 128
MAX_NL_MEANS_IMAGES = 64

#: A denoiser: float32 (N, H, W, C) noisy images in, denoised images of the same shape out (Keras, ONNX, ...).
Predictor = Callable[[NDArray[np.float32]], NDArray[Any]]
#: The model-independent rows, or a function that returns them once the model's rows are done.
ReferenceRows = Sequence[QualityRow] | Callable[[], Sequence[QualityRow]]


def noise_label(noise: NoiseSpec) -> str:
    """A short name of a noise setting, e.g. `gaussian:0.3` or `gaussian:0.05..0.5` for a range (`:unclipped`
    appended when not clipped)."""
    low, high = noise.level_range
    label = f"{noise.type}:{low:g}..{high:g}" if noise.is_range else f"{noise.type}:{low:g}"
    return label if noise.clip else f"{label}:unclipped"


def training_levels(training_noise: NoiseSpec) -> list[float]:
    """The levels at which the training noise is evaluated: its level, or for a range [min, max] min, mid, max and
    the standard sweep levels inside it, ascending."""
    low, high = training_noise.level_range
    if not training_noise.is_range:
        return [low]
    inside = {level for level in STANDARD_SWEEP_LEVELS if low <= level <= high}
    return sorted({low, round((low + high) / 2, 6), high} | inside)


def evaluation_noises(training_noise: NoiseSpec) -> list[NoiseSpec]:
    """The training noise (each of its training_levels) followed by the standard sweep (gaussian 0.1/0.2/0.3/0.5,
    clipped), no duplicates; every setting has a single level."""
    trained = [training_noise] if not training_noise.is_range else [
        training_noise.at_level(level) for level in training_levels(training_noise)
    ]
    settings = trained + [NoiseSpec(type="gaussian", level=level, clip=True) for level in STANDARD_SWEEP_LEVELS]
    unique: list[NoiseSpec] = []
    for setting in settings:
        if noise_label(setting) not in {noise_label(kept) for kept in unique}:
            unique.append(setting)
    return unique


def select_test_images(
    test_images: NDArray[np.float32], seed: int, max_images: int = MAX_EVAL_IMAGES
) -> NDArray[np.float32]:
    """The evaluation subset: at most `max_images` (and at most MAX_EVAL_PIXELS pixels) test images, seeded."""
    count = len(test_images)
    if count == 0:
        raise ValueError("Expected at least one test image. Received: 0 test images")
    height, width = test_images.shape[1], test_images.shape[2]
    limit = max(1, min(max_images, MAX_EVAL_PIXELS // max(1, height * width)))
    if count <= limit:
        return test_images
    chosen = np.sort(np.random.default_rng(seed).choice(count, size=limit, replace=False))
    return np.asarray(test_images[chosen], dtype=np.float32)


def _row(noise: NoiseSpec, method: str, clean: NDArray[np.float32], estimate: NDArray[Any]) -> QualityRow:
    return QualityRow(noise=noise_label(noise), method=method, images=len(clean), **image_quality(clean, estimate))


def reference_rows(
    test_images: NDArray[Any],
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
    they can be computed anywhere (dae.evaluation.helper runs them in a helper process while the model is exported)."""
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
    test_images: NDArray[Any],
    training_noise: NoiseSpec,
    *,
    seed: int = 0,
    max_images: int = MAX_EVAL_IMAGES,
    tv_images: int = MAX_TV_IMAGES,
    nl_means_images: int = MAX_NL_MEANS_IMAGES,
    baselines: bool = True,
    reference: ReferenceRows | None = None,
) -> list[QualityRow]:
    """The evaluation table of a denoiser on held-out test images (see the module docstring).

    `predict(noisy)` maps a float32 (N, H, W, C) batch to denoised images of the same shape (Keras, ONNX, ...);
    its output is clipped to [0, 1]. Rows: for each noise setting, `noisy`, `model`, then `tv` and `nl_means`.
    `reference`: the model-independent rows as reference_rows returns them for the same arguments, or a function
    called for them once the model's rows are done (dae.evaluation.helper); computed here when None.
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


def keras_predictor(model: Any, batch_size: int = 256) -> Predictor:
    """A `predict(images)` callable over a Keras model, in batches (predict_on_batch: no per-call overhead)."""

    def predict(images: NDArray[np.float32]) -> NDArray[np.float32]:
        batch = np.asarray(images, dtype=np.float32)
        outputs = [
            np.asarray(model.predict_on_batch(batch[start : start + batch_size]))
            for start in range(0, len(batch), batch_size)
        ]
        return np.concatenate(outputs).astype(np.float32, copy=False)

    return predict
