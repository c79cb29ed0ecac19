"""The data `fit()` sees: a seeded train/validation split and one tf.data pipeline of (noisy, clean) batches.

The training images are held once as a tensor. Epoch e (1-based) gathers them in the permutation
`default_rng([seed, e])` batch by batch and corrupts batch b with stateless noise seeded by
(seed, e·1,000,003 + b); with a level range (blind training) that seed also draws each image's level
(dae.noise.image_levels_tf), so levels are per image, fresh every batch and epoch, and reproducible. The pipeline covers the epochs a call of `fit()` still has to run, one after the other, so
`fit(steps_per_epoch=...)` reads exactly one epoch per Keras epoch, and a run resumed at epoch e sees the very
batches an uninterrupted run would. Validation images are corrupted once with fixed noise (and fixed per-image levels over a range), so
val_loss is comparable across epochs.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import tensorflow as tf

from dae.noise import add_noise, add_noise_tf
from dae.spec import NoiseSpec

VALIDATION_NOISE_STREAM = 0x7A1
_SPLIT_STREAM = 0x5A11
_EPOCH_SEED_STRIDE = 1_000_003


def split_train_validation(count: int, validation_split: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded (train indices, validation indices); at least one image always stays for training."""
    if count < 1:
        raise ValueError(f"Training needs images. Expected at least 1 training image. Received: count={count}")
    order = np.random.default_rng([seed, _SPLIT_STREAM]).permutation(count)
    validation_count = int(round(count * validation_split))
    if validation_split > 0 and count >= 2:
        validation_count = min(max(validation_count, 1), count - 1)
    else:
        validation_count = 0
    return np.sort(order[validation_count:]), np.sort(order[:validation_count])


def validation_pairs(clean: np.ndarray, noise_spec: NoiseSpec, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(noisy, clean) validation images, the noise fixed by the seed."""
    return add_noise(clean, noise_spec, seed=[seed, VALIDATION_NOISE_STREAM]), clean


def steps_per_epoch(count: int, batch_size: int) -> int:
    """Batches in one epoch of `count` images (the last one may be short)."""
    return math.ceil(count / batch_size)


def epoch_order(count: int, seed: int, epoch: int) -> np.ndarray:
    """The order in which epoch `epoch` (1-based) visits the training images."""
    return np.random.default_rng([seed, epoch]).permutation(count).astype(np.int64)


def noisy_batches(
    images: np.ndarray, batch_size: int, noise_spec: NoiseSpec, seed: int, *, first_epoch: int, last_epoch: int
) -> tf.data.Dataset:
    """(noisy, clean) batches of epochs first_epoch..last_epoch (1-based, inclusive), in that order."""
    if not 1 <= first_epoch <= last_epoch:
        raise ValueError(
            "noisy_batches needs a non-empty range of 1-based epochs. Expected 1 <= first_epoch <= last_epoch. "
            f"Received: first_epoch={first_epoch}, last_epoch={last_epoch}"
        )
    # One tensor copy of the training images for the whole run; batches gather from it.
    pixels = tf.convert_to_tensor(images, dtype=tf.float32)
    count = int(images.shape[0])
    seed_high = tf.constant(seed, dtype=tf.int64)

    def permutation(epoch: Any) -> np.ndarray:
        return epoch_order(count, seed, int(epoch))

    def epoch_batches(epoch: tf.Tensor) -> tf.data.Dataset:
        order = tf.numpy_function(permutation, [epoch], tf.int64, stateful=False)
        order.set_shape([count])
        epoch_base = epoch * _EPOCH_SEED_STRIDE

        def make_pair(batch_index: tf.Tensor, indices: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
            clean = tf.gather(pixels, indices)
            noise_seed = tf.stack([seed_high, epoch_base + batch_index])
            return add_noise_tf(clean, noise_spec, noise_seed), clean

        return tf.data.Dataset.from_tensor_slices(order).batch(batch_size).enumerate().map(make_pair)

    epochs = tf.data.Dataset.range(first_epoch, last_epoch + 1)
    return epochs.flat_map(epoch_batches).prefetch(2)
