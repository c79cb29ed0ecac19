"""The evaluation table: rows, baselines, the clipped model output, the seeded subset, reference rows."""

from __future__ import annotations

import numpy as np
import pytest

from dae.evaluation import metrics, report
from dae.noise import add_noise
from dae.spec import NoiseSpec


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

    rows = report.evaluate_denoiser(identity, clean, NoiseSpec(type="gaussian", level=0.3), seed=0, nl_means_images=8)
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

    noises = report.evaluation_noises(NoiseSpec(type="salt_pepper", level=0.2))
    for index, noise in enumerate(noises):
        noisy = add_noise(clean, noise, seed=[5, index])
        by_bytes.update(
            {noisy_image.tobytes(): clean_image for noisy_image, clean_image in zip(noisy, clean, strict=True)}
        )
    rows = report.evaluate_denoiser(oracle, clean, NoiseSpec(type="salt_pepper", level=0.2), seed=5, baselines=False)
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
        report.evaluate_denoiser(lambda noisy: noisy[:, :-1], clean, NoiseSpec(), baselines=False)
    with pytest.raises(ValueError, match="NaN"):
        report.evaluate_denoiser(lambda noisy: noisy * np.nan, clean, NoiseSpec(), baselines=False)


def test_evaluation_subset_is_bounded_and_seeded() -> None:
    test = np.random.default_rng(0).random((600, 8, 8, 1)).astype(np.float32)
    subset = report.select_test_images(test, seed=1)
    assert len(subset) == 512
    np.testing.assert_array_equal(subset, report.select_test_images(test, seed=1))
    large = np.zeros((300, 64, 64, 1), dtype=np.float32)
    assert len(report.select_test_images(large, seed=0)) == 128  # 512·32·32 pixels / (64·64)


def test_reference_rows_are_the_model_independent_rows_of_the_table() -> None:
    clean = smooth_images(20)
    noise = NoiseSpec(type="gaussian", level=0.2)

    def shrink(noisy: np.ndarray) -> np.ndarray:
        return 0.5 * noisy + 0.25

    table = report.evaluate_denoiser(shrink, clean, noise, seed=4, nl_means_images=6)
    reference = report.reference_rows(clean, noise, seed=4, nl_means_images=6)
    assert [(row.noise, row.method) for row in reference] == [
        (row.noise, row.method) for row in table if row.method != "model"
    ]
    assert reference == [row for row in table if row.method != "model"]  # every number, exactly
    # Merged back (as a list, or from a function called once the model's rows are done): the very same table.
    assert report.evaluate_denoiser(shrink, clean, noise, seed=4, reference=reference) == table
    assert report.evaluate_denoiser(shrink, clean, noise, seed=4, reference=lambda: reference) == table
    assert reference[0].psnr < table[1].psnr  # the model row really is the model's (shrinking beats the noise)


def test_evaluation_rejects_reference_rows_of_other_settings() -> None:
    clean = smooth_images(10)
    reference = report.reference_rows(clean, NoiseSpec(type="gaussian", level=0.3), seed=0, baselines=False)
    with pytest.raises(ValueError, match="reference rows"):  # another training noise: other settings
        report.evaluate_denoiser(lambda noisy: noisy, clean, NoiseSpec(type="masking", level=0.3),
                                  reference=reference)
    with pytest.raises(ValueError, match="over 8 images"):  # another image count
        report.evaluate_denoiser(lambda noisy: noisy, clean[:8], NoiseSpec(type="gaussian", level=0.3),
                                  reference=reference)
