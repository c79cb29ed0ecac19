"""The classical baselines: the noise estimate and TV/NL-means through scikit-image."""

from __future__ import annotations

import numpy as np
import pytest

from dae.evaluation import baselines
from dae.noise import add_noise
from dae.spec import NoiseSpec


def test_noise_sigma_estimate() -> None:
    rng = np.random.default_rng(2)
    flat = np.full((256, 256, 1), 0.5) + 0.1 * rng.standard_normal((256, 256, 1))
    assert baselines.estimate_noise_sigma(flat) == pytest.approx(0.1, rel=0.05)
    assert baselines.estimate_noise_sigma(np.full((16, 16, 3), 0.3)) == 0.0


def test_batched_tv_matches_skimage_image_by_image() -> None:
    """The batched Chambolle iteration gives each image skimage's own result (its weight, its own stopping point)."""
    from skimage.restoration import denoise_tv_chambolle

    rng = np.random.default_rng(3)
    clean = rng.random((6, 12, 10, 1)).astype(np.float32)
    gray = add_noise(clean, NoiseSpec(type="gaussian", level=0.2), seed=1)
    color = add_noise(rng.random((3, 9, 11, 3)).astype(np.float32), NoiseSpec(type="gaussian", level=0.4), seed=2)
    for noisy in (gray, color):
        batched = baselines.denoise_tv_batch(noisy)
        for image, result in zip(noisy, batched, strict=True):
            weight = max(baselines.TV_WEIGHT_PER_SIGMA * baselines.estimate_noise_sigma(image), 1e-4)
            multichannel = image.shape[-1] > 1
            expected = denoise_tv_chambolle(image if multichannel else image[..., 0], weight=weight,
                                            channel_axis=-1 if multichannel else None)
            np.testing.assert_allclose(result, np.clip(expected.reshape(image.shape), 0, 1), atol=1e-6)
        assert not np.allclose(batched, noisy, atol=1e-3), "TV must actually change noisy images"


def test_vectorized_noise_estimate_equals_the_per_image_one() -> None:
    images = add_noise(np.full((5, 16, 16, 2), 0.5, np.float32), NoiseSpec(type="gaussian", level=0.1, clip=False),
                       seed=[4, 5])
    expected = [baselines.estimate_noise_sigma(image) for image in images]
    np.testing.assert_allclose(baselines.estimate_noise_sigmas(images), expected, rtol=1e-9)
    assert 0.07 < float(np.mean(expected)) < 0.13
