"""Metrics against hand-computed values and skimage, the evaluation table, the sparsity report."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from dae import metrics
from dae.noise import add_noise
from dae.spec import NoiseSpec

C1, C2 = 0.01**2, 0.03**2


def test_psnr_l1_mse_hand_computed() -> None:
    clean = np.zeros((2, 4, 4, 1), dtype=np.float32)
    estimate = clean.copy()
    estimate[0] = 0.1  # MSE 0.01 -> 20 dB, L1 0.1
    estimate[1, :2] = 0.02  # half the pixels off by 0.02: MSE 0.0002 -> 36.9897 dB, L1 0.01
    np.testing.assert_allclose(metrics.mse_per_image(clean, estimate), [0.01, 0.0002], rtol=1e-6)
    np.testing.assert_allclose(metrics.l1_per_image(clean, estimate), [0.1, 0.01], rtol=1e-6)
    np.testing.assert_allclose(metrics.psnr_per_image(clean, estimate), [20.0, 10 * np.log10(5000)], rtol=1e-6)
    quality = metrics.image_quality(clean, estimate)
    assert quality["psnr"] == pytest.approx((20.0 + 36.98970004) / 2, rel=1e-6)
    assert quality["mse"] == pytest.approx(0.0051, rel=1e-6)
    assert quality["l1"] == pytest.approx(0.055, rel=1e-6)
    # Identical images: capped instead of +inf (JSON cannot hold inf).
    assert metrics.psnr_per_image(clean, clean).tolist() == [metrics.PSNR_CAP_DB] * 2


def test_psnr_matches_skimage() -> None:
    rng = np.random.default_rng(0)
    clean = rng.random((3, 9, 11, 1))
    noisy = np.clip(clean + 0.1 * rng.standard_normal(clean.shape), 0, 1)
    expected = [peak_signal_noise_ratio(a, b, data_range=1) for a, b in zip(clean, noisy, strict=True)]
    np.testing.assert_allclose(metrics.psnr_per_image(clean, noisy), expected, rtol=1e-10)


def test_ssim_of_constant_images_hand_computed() -> None:
    # Constant images: variances and covariance are 0, so SSIM = (2ab + C1) / (a² + b² + C1) exactly.
    clean = np.full((1, 8, 8, 1), 0.5)
    estimate = np.full((1, 8, 8, 1), 0.25)
    expected = (2 * 0.5 * 0.25 + C1) / (0.5**2 + 0.25**2 + C1)
    assert metrics.ssim_per_image(clean, estimate)[0] == pytest.approx(expected, rel=1e-9)
    assert metrics.ssim_per_image(clean, clean)[0] == pytest.approx(1.0)


def test_ssim_of_a_negated_pattern_hand_computed() -> None:
    # y = 1 - x: equal means (0.5) and variances, covariance = -variance, so SSIM = (C1+... )·(C2 - 2v)/(...)(2v + C2).
    x = np.zeros((1, 7, 7, 1))
    x[0, ::2, :, 0] = 1.0  # alternate rows of 1 and 0; on 7x7 reflect padding keeps the window statistics fixed
    y = 1.0 - x
    values = x[0, :, :, 0]
    mean = values.mean()
    variance = values.var() * 49 / 48  # sample variance, as skimage uses
    luminance = (2 * mean * (1 - mean) + C1) / (mean**2 + (1 - mean) ** 2 + C1)
    structure = (-2 * variance + C2) / (2 * variance + C2)
    # A 7x7 image has exactly one valid 7x7 window (the centre pixel), which sees the whole image.
    assert metrics.ssim_per_image(x, y)[0] == pytest.approx(luminance * structure, rel=1e-9)


@pytest.mark.parametrize("shape", [(4, 28, 28, 1), (3, 9, 10, 3), (2, 5, 6, 1)])
def test_ssim_matches_skimage(shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(1)
    clean = rng.random(shape)
    noisy = np.clip(clean + 0.2 * rng.standard_normal(shape), 0, 1)
    side = min(7, shape[1], shape[2])
    window = side if side % 2 == 1 else side - 1  # skimage needs an explicit odd window on small images
    expected = [
        structural_similarity(a, b, data_range=1, channel_axis=-1, win_size=window)
        for a, b in zip(clean, noisy, strict=True)
    ]
    np.testing.assert_allclose(metrics.ssim_per_image(clean, noisy), expected, atol=1e-9)


def test_metrics_validate_shapes() -> None:
    with pytest.raises(ValueError, match="same shape"):
        metrics.image_quality(np.zeros((2, 4, 4, 1)), np.zeros((2, 4, 5, 1)))
    with pytest.raises(ValueError, match="at least 3x3"):
        metrics.ssim_per_image(np.zeros((1, 2, 2, 1)), np.zeros((1, 2, 2, 1)))
    with pytest.raises(ValueError, match=r"\(N, H, W, C\)"):
        metrics.psnr_per_image(np.zeros(4), np.zeros(4))


def test_noise_sigma_estimate() -> None:
    rng = np.random.default_rng(2)
    flat = np.full((256, 256, 1), 0.5) + 0.1 * rng.standard_normal((256, 256, 1))
    assert metrics.estimate_noise_sigma(flat) == pytest.approx(0.1, rel=0.05)
    assert metrics.estimate_noise_sigma(np.full((16, 16, 3), 0.3)) == 0.0


def smooth_images(count: int, side: int = 24) -> np.ndarray:
    """Soft blobs: images where classical denoisers clearly help."""
    rng = np.random.default_rng(3)
    grid = np.linspace(-1, 1, side)
    yy, xx = np.meshgrid(grid, grid, indexing="ij")
    images = []
    for _ in range(count):
        cy, cx, radius = rng.uniform(-0.5, 0.5), rng.uniform(-0.5, 0.5), rng.uniform(0.3, 0.7)
        images.append(0.15 + 0.7 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / radius**2))
    return np.asarray(images, dtype=np.float32)[..., np.newaxis]


def test_evaluation_table_rows_and_baselines() -> None:
    clean = smooth_images(40)
    lookup = {image.tobytes(): None for image in clean}
    assert len(lookup) == 40

    def identity(noisy: np.ndarray) -> np.ndarray:
        return noisy

    rows = metrics.evaluate_denoiser(identity, clean, NoiseSpec(type="gaussian", level=0.3), seed=0, nl_means_images=8)
    labels = [row.noise for row in rows[::4]]
    assert labels == ["gaussian:0.3", "gaussian:0.1", "gaussian:0.2", "gaussian:0.5"]  # training noise first, no dup
    assert [row.method for row in rows[:4]] == ["noisy", "model", "tv", "nl_means"]
    assert [row.images for row in rows[:4]] == [40, 40, 40, 8]
    by_key = {(row.noise, row.method): row for row in rows}
    for noise in labels:
        noisy, model = by_key[(noise, "noisy")], by_key[(noise, "model")]
        assert (model.psnr, model.ssim, model.l1, model.mse) == (noisy.psnr, noisy.ssim, noisy.l1, noisy.mse)
    # The noisy row is the metric of exactly the noise add_noise draws (seed [seed, setting index]).
    expected_noisy = add_noise(clean, NoiseSpec(type="gaussian", level=0.3), seed=[0, 0])
    assert by_key[("gaussian:0.3", "noisy")].psnr == pytest.approx(metrics.image_quality(clean, expected_noisy)["psnr"])
    assert by_key[("gaussian:0.3", "noisy")].psnr == pytest.approx(11.0, abs=1.5)
    # The classical baselines are tuned, not strawmen: several dB better than the noisy input at σ = 0.3.
    assert by_key[("gaussian:0.3", "tv")].psnr > by_key[("gaussian:0.3", "noisy")].psnr + 4
    assert by_key[("gaussian:0.3", "nl_means")].psnr > by_key[("gaussian:0.3", "noisy")].psnr + 4


def test_evaluation_uses_the_clipped_model_output_and_the_training_noise() -> None:
    clean = smooth_images(12)
    by_bytes = {}

    def oracle(noisy: np.ndarray) -> np.ndarray:
        # Returns the clean image (plus an out-of-range offset the evaluation must clip away).
        return np.stack([by_bytes[image.tobytes()] for image in noisy]) * 3.0 - 1.0

    noises = metrics.evaluation_noises(NoiseSpec(type="salt_pepper", level=0.2))
    for index, noise in enumerate(noises):
        noisy = add_noise(clean, noise, seed=[5, index])
        by_bytes.update(
            {noisy_image.tobytes(): clean_image for noisy_image, clean_image in zip(noisy, clean, strict=True)}
        )
    rows = metrics.evaluate_denoiser(oracle, clean, NoiseSpec(type="salt_pepper", level=0.2), seed=5, baselines=False)
    assert [row.noise for row in rows[::2]] == [
        "salt_pepper:0.2",
        "gaussian:0.1",
        "gaussian:0.2",
        "gaussian:0.3",
        "gaussian:0.5",
    ]
    expected = metrics.image_quality(clean, np.clip(clean * 3.0 - 1.0, 0, 1))
    for row in rows[1::2]:
        assert row.method == "model"
        assert row.psnr == pytest.approx(expected["psnr"]) and row.l1 == pytest.approx(expected["l1"])


def test_evaluation_rejects_broken_predictors() -> None:
    clean = smooth_images(4)
    with pytest.raises(ValueError, match="same|shape"):
        metrics.evaluate_denoiser(lambda noisy: noisy[:, :-1], clean, NoiseSpec(), baselines=False)
    with pytest.raises(ValueError, match="NaN"):
        metrics.evaluate_denoiser(lambda noisy: noisy * np.nan, clean, NoiseSpec(), baselines=False)


def test_evaluation_subset_is_bounded_and_seeded() -> None:
    test = np.random.default_rng(0).random((600, 8, 8, 1)).astype(np.float32)
    subset = metrics.select_test_images(test, seed=1)
    assert len(subset) == 512
    np.testing.assert_array_equal(subset, metrics.select_test_images(test, seed=1))
    large = np.zeros((300, 64, 64, 1), dtype=np.float32)
    assert len(metrics.select_test_images(large, seed=0)) == 128  # 512·32·32 pixels / (64·64)


def test_layer_sparsity_hand_computed() -> None:
    kernel = np.array([[0.0, 0.0, 5e-7, -3.0], [4.0, 0.0, -1e-3, 0.0]])
    report = metrics.layer_sparsity("code", kernel)
    assert report.weights == 8
    assert report.zero_fraction == 4 / 8
    assert report.near_zero_fraction == 5 / 8
    assert report.l1_norm == pytest.approx(7.0010005)
    assert report.l2_norm == pytest.approx(np.sqrt(9 + 16 + 1e-6 + 25e-14))


def test_sparsity_report_of_a_keras_model() -> None:
    keras = pytest.importorskip("keras")
    inputs = keras.Input(shape=(3,))
    code = keras.layers.Dense(4, activation="relu", name="code")(inputs)
    outputs = keras.layers.Dense(3, name="decoder_output")(code)
    model = keras.Model(inputs, outputs)
    # Units 0 and 1 always fire (bias 1, zero kernel), units 2 and 3 never (bias -1): code zero fraction 0.5.
    code_kernel = np.zeros((3, 4), dtype=np.float32)
    code_kernel[0, 0] = 1e-3
    model.get_layer("code").set_weights([code_kernel, np.array([1, 1, -1, -1], dtype=np.float32)])
    decoder_kernel = np.arange(12, dtype=np.float32).reshape(4, 3)
    model.get_layer("decoder_output").set_weights([decoder_kernel, np.zeros(3, dtype=np.float32)])
    images = np.random.default_rng(0).random((10, 3)).astype(np.float32)

    report = metrics.sparsity_report(model, images)
    assert [layer.layer for layer in report.layers] == ["code", "decoder_output"]
    code_layer, decoder_layer = report.layers
    assert code_layer.weights == 12 and code_layer.zero_fraction == 11 / 12
    assert decoder_layer.zero_fraction == 1 / 12 and decoder_layer.l1_norm == pytest.approx(66.0)
    assert report.code_zero_fraction == 0.5


def test_batched_tv_matches_skimage_image_by_image() -> None:
    """The batched Chambolle iteration gives each image skimage's own result (its weight, its own stopping point)."""
    from skimage.restoration import denoise_tv_chambolle

    rng = np.random.default_rng(3)
    clean = rng.random((6, 12, 10, 1)).astype(np.float32)
    gray = add_noise(clean, NoiseSpec(type="gaussian", level=0.2), seed=1)
    color = add_noise(rng.random((3, 9, 11, 3)).astype(np.float32), NoiseSpec(type="gaussian", level=0.4), seed=2)
    for noisy in (gray, color):
        batched = metrics.denoise_tv_batch(noisy)
        for image, result in zip(noisy, batched, strict=True):
            weight = max(metrics.TV_WEIGHT_PER_SIGMA * metrics.estimate_noise_sigma(image), 1e-4)
            multichannel = image.shape[-1] > 1
            expected = denoise_tv_chambolle(image if multichannel else image[..., 0], weight=weight,
                                            channel_axis=-1 if multichannel else None)
            np.testing.assert_allclose(result, np.clip(expected.reshape(image.shape), 0, 1), atol=1e-6)
        assert not np.allclose(batched, noisy, atol=1e-3), "TV must actually change noisy images"


def test_vectorized_noise_estimate_equals_the_per_image_one() -> None:
    images = add_noise(np.full((5, 16, 16, 2), 0.5, np.float32), NoiseSpec(type="gaussian", level=0.1, clip=False),
                       seed=[4, 5])
    expected = [metrics.estimate_noise_sigma(image) for image in images]
    np.testing.assert_allclose(metrics.estimate_noise_sigmas(images), expected, rtol=1e-9)
    assert 0.07 < float(np.mean(expected)) < 0.13


def test_reference_rows_are_the_model_independent_rows_of_the_table() -> None:
    clean = smooth_images(20)
    noise = NoiseSpec(type="gaussian", level=0.2)

    def shrink(noisy: np.ndarray) -> np.ndarray:
        return 0.5 * noisy + 0.25

    table = metrics.evaluate_denoiser(shrink, clean, noise, seed=4, nl_means_images=6)
    reference = metrics.reference_rows(clean, noise, seed=4, nl_means_images=6)
    assert [(row.noise, row.method) for row in reference] == [
        (row.noise, row.method) for row in table if row.method != "model"
    ]
    assert reference == [row for row in table if row.method != "model"]  # every number, exactly
    # Merged back (as a list, or from a function called once the model's rows are done): the very same table.
    assert metrics.evaluate_denoiser(shrink, clean, noise, seed=4, reference=reference) == table
    assert metrics.evaluate_denoiser(shrink, clean, noise, seed=4, reference=lambda: reference) == table
    assert reference[0].psnr < table[1].psnr  # the model row really is the model's (shrinking beats the noise)


def test_evaluation_rejects_reference_rows_of_other_settings() -> None:
    clean = smooth_images(10)
    reference = metrics.reference_rows(clean, NoiseSpec(type="gaussian", level=0.3), seed=0, baselines=False)
    with pytest.raises(ValueError, match="reference rows"):  # another training noise: other settings
        metrics.evaluate_denoiser(lambda noisy: noisy, clean, NoiseSpec(type="masking", level=0.3),
                                  reference=reference)
    with pytest.raises(ValueError, match="over 8 images"):  # another image count
        metrics.evaluate_denoiser(lambda noisy: noisy, clean[:8], NoiseSpec(type="gaussian", level=0.3),
                                  reference=reference)


def test_image_quality_equals_the_separate_metrics() -> None:
    rng = np.random.default_rng(6)
    clean = rng.random((5, 13, 11, 2)).astype(np.float32)
    estimate = np.clip(clean + 0.1 * rng.standard_normal(clean.shape), 0, 1).astype(np.float32)
    quality = metrics.image_quality(clean, estimate)
    assert quality == {
        "psnr": float(np.mean(metrics.psnr_per_image(clean, estimate))),
        "ssim": float(np.mean(metrics.ssim_per_image(clean, estimate))),
        "l1": float(np.mean(metrics.l1_per_image(clean, estimate))),
        "mse": float(np.mean(metrics.mse_per_image(clean, estimate))),
    }
