"""Metrics against hand-computed values and skimage, and the sparsity report."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from dae.evaluation import metrics

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
