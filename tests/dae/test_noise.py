"""Noise models: statistics, clipping, determinism, and agreement of the NumPy and TensorFlow versions."""

from __future__ import annotations

import numpy as np
import pytest

from dae.noise import add_noise, add_noise_tf
from dae.spec import NoiseSpec

SHAPE = (64, 16, 16, 3)


def _constant_images(value: float) -> np.ndarray:
    return np.full(SHAPE, value, dtype=np.float32)


def _tf_noise(images: np.ndarray, noise: NoiseSpec, seed: tuple[int, int]) -> np.ndarray:
    import tensorflow as tf

    return add_noise_tf(tf.constant(images), noise, tf.constant(seed, dtype=tf.int64)).numpy()


@pytest.fixture(params=["numpy", "tensorflow"])
def corrupt(request):
    """Both implementations behind one signature: corrupt(images, noise, seed) -> np.ndarray."""
    if request.param == "numpy":
        return lambda images, noise, seed: add_noise(images, noise, seed)
    return lambda images, noise, seed: _tf_noise(images, noise, (seed, 7))


def test_gaussian_adds_zero_mean_noise_with_the_given_stddev(corrupt):
    noisy = corrupt(_constant_images(0.5), NoiseSpec(type="gaussian", level=0.1, clip=False), 1)
    assert noisy.dtype == np.float32 and noisy.shape == SHAPE
    assert abs(noisy.mean() - 0.5) < 0.005
    assert abs(noisy.std() - 0.1) < 0.005


def test_clipping_keeps_values_in_unit_range_and_without_clip_they_leave_it(corrupt):
    images = _constant_images(0.5)
    clipped = corrupt(images, NoiseSpec(type="gaussian", level=1.0, clip=True), 2)
    unclipped = corrupt(images, NoiseSpec(type="gaussian", level=1.0, clip=False), 2)
    assert clipped.min() == 0.0 and clipped.max() == 1.0
    assert unclipped.min() < -1.0 and unclipped.max() > 2.0


def test_salt_pepper_sets_the_given_fraction_of_whole_pixels_to_black_or_white(corrupt):
    noisy = corrupt(_constant_images(0.5), NoiseSpec(type="salt_pepper", level=0.2), 3)
    changed = noisy != 0.5
    # Every channel of a pixel changes together.
    assert np.array_equal(changed.all(axis=-1), changed.any(axis=-1))
    pixel_changed = changed[..., 0]
    assert abs(pixel_changed.mean() - 0.2) < 0.01
    salt = (noisy[..., 0] == 1.0).mean()
    pepper = (noisy[..., 0] == 0.0).mean()
    assert abs(salt - 0.1) < 0.01 and abs(pepper - 0.1) < 0.01


def test_masking_zeroes_the_given_fraction_of_pixels(corrupt):
    noisy = corrupt(_constant_images(0.5), NoiseSpec(type="masking", level=0.3), 4)
    zeroed = noisy[..., 0] == 0.0
    assert abs(zeroed.mean() - 0.3) < 0.01
    assert np.all(noisy[~zeroed] == 0.5)
    assert np.array_equal((noisy == 0).all(axis=-1), (noisy == 0).any(axis=-1))


def test_speckle_is_multiplicative(corrupt):
    images = np.zeros(SHAPE, dtype=np.float32)
    images[:, :8] = 0.5
    noisy = corrupt(images, NoiseSpec(type="speckle", level=0.2, clip=False), 5)
    assert np.all(noisy[:, 8:] == 0.0)  # black stays black
    assert abs(noisy[:, :8].std() - 0.5 * 0.2) < 0.005
    assert abs(noisy[:, :8].mean() - 0.5) < 0.005


@pytest.mark.parametrize("noise_type", ["gaussian", "salt_pepper", "masking", "speckle"])
def test_level_zero_leaves_images_unchanged(corrupt, noise_type):
    images = np.random.default_rng(0).random(SHAPE, dtype=np.float32)
    assert np.array_equal(corrupt(images, NoiseSpec(type=noise_type, level=0.0), 6), images)


@pytest.mark.parametrize("noise_type", ["gaussian", "salt_pepper", "masking", "speckle"])
def test_same_seed_same_noise_other_seed_other_noise(corrupt, noise_type):
    images = np.random.default_rng(0).random(SHAPE, dtype=np.float32)
    noise = NoiseSpec(type=noise_type, level=0.3)
    first, again, other = corrupt(images, noise, 11), corrupt(images, noise, 11), corrupt(images, noise, 12)
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)


def test_numpy_noise_accepts_a_single_image_and_rejects_other_ranks():
    image = np.full((8, 8, 1), 0.5, dtype=np.float32)
    assert add_noise(image, NoiseSpec(level=0.1), 0).shape == (8, 8, 1)
    with pytest.raises(ValueError, match=r"Received: images.ndim=2"):
        add_noise(np.zeros((8, 8), dtype=np.float32), NoiseSpec(), 0)


def test_numpy_noise_does_not_modify_its_input():
    images = _constant_images(0.5)
    add_noise(images, NoiseSpec(type="masking", level=0.5), 0)
    assert np.all(images == 0.5)
