"""The data `fit()` sees: a seeded train/validation split and one tf.data pipeline of (noisy, clean) batches.

The training images are held once as a tensor. Epoch e (1-based) gathers them in the permutation
`default_rng([seed, e])` batch by batch and corrupts batch b with stateless noise seeded by
(seed, e·1,000,003 + b); with a level range (blind training) that seed also draws each image's level
(dae.noise.image_levels_tf), so levels are per image, fresh every batch and epoch, and reproducible. The pipeline covers the epochs a call of `fit()` still has to run, one after the other, so
`fit(steps_per_epoch=...)` reads exactly one epoch per Keras epoch, and a run resumed at epoch e sees the very
batches an uninterrupted run would. Validation images are corrupted once with fixed noise (and fixed per-image levels over a range), so
val_loss is comparable across epochs. With `loss.level_weighting` k > 0 every batch (and the validation set) also
carries each image's loss weight (dae.losses.level_weights of its level), the third element Keras' fit() reads
as sample weights.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import tensorflow as tf

from dae.losses import level_weights
from dae.noise import add_noise, add_noise_tf, image_levels, image_levels_tf
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


def validation_pairs(
    clean: np.ndarray, noise_spec: NoiseSpec, seed: int, level_weighting: float = 0.0
) -> tuple[np.ndarray, ...]:
    """(noisy, clean) validation images, the noise fixed by the seed; with level_weighting > 0 also each image's
    loss weight, (noisy, clean, weights)."""
    noise_seed = [seed, VALIDATION_NOISE_STREAM]
    noisy = add_noise(clean, noise_spec, seed=noise_seed)
    if level_weighting == 0:
        return noisy, clean
    levels = image_levels(noise_spec, len(clean), seed=noise_seed)
    return noisy, clean, level_weights(levels, noise_spec.level_range, level_weighting).astype(np.float32)


def steps_per_epoch(count: int, batch_size: int) -> int:
    """Batches in one epoch of `count` images (the last one may be short)."""
    return math.ceil(count / batch_size)


def epoch_order(count: int, seed: int, epoch: int) -> np.ndarray:
    """The order in which epoch `epoch` (1-based) visits the training images."""
    return np.random.default_rng([seed, epoch]).permutation(count).astype(np.int64)


def noisy_batches(
    images: np.ndarray,
    batch_size: int,
    noise_spec: NoiseSpec,
    seed: int,
    *,
    first_epoch: int,
    last_epoch: int,
    level_weighting: float = 0.0,
) -> tf.data.Dataset:
    """(noisy, clean) batches of epochs first_epoch..last_epoch (1-based, inclusive), in that order; with
    level_weighting > 0, (noisy, clean, weights) batches."""
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

        def make_pair(batch_index: tf.Tensor, indices: tf.Tensor) -> tuple[tf.Tensor, ...]:
            clean = tf.gather(pixels, indices)
            noise_seed = tf.stack([seed_high, epoch_base + batch_index])
            noisy = add_noise_tf(clean, noise_spec, noise_seed)
            if level_weighting == 0:
                return noisy, clean
            # The same stateless draw add_noise_tf made, so each weight belongs to its image's level.
            levels = image_levels_tf(noise_spec, tf.shape(clean)[0], noise_seed)
            return noisy, clean, level_weights(levels, noise_spec.level_range, level_weighting)

        return tf.data.Dataset.from_tensor_slices(order).batch(batch_size).enumerate().map(make_pair)

    epochs = tf.data.Dataset.range(first_epoch, last_epoch + 1)
    return epochs.flat_map(epoch_batches).prefetch(2)
