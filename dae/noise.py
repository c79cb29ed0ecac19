"""Noise models that corrupt clean images: Gaussian, salt-and-pepper, masking and speckle.

Two implementations of the same formulas:

- `add_noise` (NumPy) for evaluation and serving: deterministic for a given seed.
- `add_noise_tf` (TensorFlow stateless random ops) for the `tf.data` training pipeline: a fresh draw per batch,
  seeded by a (2,) integer seed tensor so that a run, and a run resumed from a checkpoint, see the same noise.

Images are float arrays in [0, 1] whose last axis holds the channels. Salt-and-pepper and masking act on whole
pixels (every channel of a pixel at once); Gaussian and speckle noise are independent per channel value.
When `noise.clip` is set the noisy image is clipped to [0, 1], where images live.

A level range `[min, max]` (blind training) gives every image its own level, drawn uniformly from the range: in
NumPy as the generator's first draws (`image_levels`), in TensorFlow from the batch's seed folded with
LEVEL_SEED_STREAM (`image_levels_tf`); the noise itself is then drawn exactly as for one level. A single number
draws no levels, so its noise is what it always was.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from dae.spec import NoiseSpec

if TYPE_CHECKING:
    import tensorflow as tf

#: Folded into a batch's (2,) seed to draw its per-image levels, so the noise draws keep the batch's own seed.
LEVEL_SEED_STREAM = 0x1E7E1


def _check_images_rank(ndim: int) -> None:
    if ndim not in (3, 4):
        raise ValueError(
            "add_noise needs images shaped (N, H, W, C) or (H, W, C). Expected a 3- or 4-dimensional array. "
            f"Received: images.ndim={ndim}"
        )


def add_noise(images: np.ndarray, noise: NoiseSpec, seed: int | Sequence[int]) -> np.ndarray:
    """Return a noisy float32 copy of `images` (values in [0, 1], channels last), deterministic for `seed`."""
    clean = np.asarray(images, dtype=np.float32)
    _check_images_rank(clean.ndim)
    rng = np.random.default_rng(seed)
    level: np.float32 | np.ndarray = np.float32(noise.level_range[0])
    if noise.is_range:
        count = clean.shape[0] if clean.ndim == 4 else 1
        levels = _draw_levels(rng, noise, count)
        level = levels.reshape((count, 1, 1, 1)) if clean.ndim == 4 else levels[0]
    pixel_shape = clean.shape[:-1] + (1,)
    if noise.type == "gaussian":
        noisy = clean + level * rng.standard_normal(clean.shape, dtype=np.float32)
    elif noise.type == "speckle":
        noisy = clean * (1.0 + level * rng.standard_normal(clean.shape, dtype=np.float32))
    elif noise.type == "salt_pepper":
        draw = rng.random(pixel_shape, dtype=np.float32)
        # Half of the corrupted pixels become white (salt), half black (pepper).
        noisy = np.where(draw < level / 2, np.float32(1.0), np.where(draw < level, np.float32(0.0), clean))
    elif noise.type == "masking":
        draw = rng.random(pixel_shape, dtype=np.float32)
        noisy = np.where(draw < level, np.float32(0.0), clean)
    else:  # NoiseSpec validates the type; this guards against a spec built without validation.
        raise ValueError(
            "Unknown noise type. Expected one of gaussian, salt_pepper, masking, speckle. "
            f"Received: noise.type={noise.type!r}"
        )
    if noise.clip:
        noisy = np.clip(noisy, 0.0, 1.0)
    return noisy.astype(np.float32, copy=False)


def _draw_levels(rng: np.random.Generator, noise: NoiseSpec, count: int) -> np.ndarray:
    low, high = noise.level_range
    return rng.uniform(low, high, size=count).astype(np.float32)


def image_levels(noise: NoiseSpec, count: int, seed: int | Sequence[int]) -> np.ndarray:
    """The (count,) float32 levels `add_noise(images, noise, seed)` gives `count` images (all equal for a number)."""
    if not noise.is_range:
        return np.full(count, noise.level_range[0], dtype=np.float32)
    return _draw_levels(np.random.default_rng(seed), noise, count)


def image_levels_tf(noise: NoiseSpec, count: Any, seed: Any) -> tf.Tensor:
    """The (count,) float32 levels `add_noise_tf` gives a batch of `count` images under the (2,) `seed`."""
    import tensorflow as tf

    low, high = noise.level_range
    if not noise.is_range:
        return tf.fill(tf.reshape(count, [1]), tf.constant(low, dtype=tf.float32))
    level_seed = tf.random.experimental.stateless_fold_in(seed, LEVEL_SEED_STREAM)
    return tf.random.stateless_uniform(tf.reshape(count, [1]), seed=level_seed, minval=low, maxval=high)


def add_noise_tf(images: tf.Tensor, noise: NoiseSpec, seed: Any) -> tf.Tensor:
    """TensorFlow version of `add_noise` for graphs: `seed` is a shape-(2,) int32/int64 tensor (stateless RNG)."""
    import tensorflow as tf

    clean = tf.convert_to_tensor(images, dtype=tf.float32)
    shape = tf.shape(clean)
    level = tf.constant(noise.level_range[0], dtype=tf.float32)
    if noise.is_range:
        _check_images_rank(clean.shape.rank if clean.shape.rank is not None else -1)
        levels = image_levels_tf(noise, shape[0] if clean.shape.rank == 4 else 1, seed)
        level = tf.reshape(levels, [-1, 1, 1, 1]) if clean.shape.rank == 4 else levels[0]
    pixel_shape = tf.concat([shape[:-1], [1]], axis=0)
    if noise.type == "gaussian":
        noisy = clean + level * tf.random.stateless_normal(shape, seed=seed, dtype=tf.float32)
    elif noise.type == "speckle":
        noisy = clean * (1.0 + level * tf.random.stateless_normal(shape, seed=seed, dtype=tf.float32))
    elif noise.type == "salt_pepper":
        draw = tf.random.stateless_uniform(pixel_shape, seed=seed, dtype=tf.float32)
        noisy = tf.where(draw < level / 2, 1.0, tf.where(draw < level, 0.0, clean))
    elif noise.type == "masking":
        draw = tf.random.stateless_uniform(pixel_shape, seed=seed, dtype=tf.float32)
        noisy = tf.where(draw < level, 0.0, clean)
    else:
        raise ValueError(
            "Unknown noise type. Expected one of gaussian, salt_pepper, masking, speckle. "
            f"Received: noise.type={noise.type!r}"
        )
    if noise.clip:
        noisy = tf.clip_by_value(noisy, 0.0, 1.0)
    return noisy
