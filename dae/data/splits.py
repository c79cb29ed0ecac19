"""Train/test splits: DatasetSplits, the seeded split of uploaded datasets, the seeded training subset."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from dae.errors import InvalidDataset

#: Uploaded datasets: fraction of images held out for testing, and its bounds.
UPLOAD_TEST_FRACTION = 0.1
UPLOAD_MAX_TEST_IMAGES = 512
#: Uploads need one image to train on and one to test on.
MIN_UPLOAD_IMAGES = 2


@dataclass(frozen=True)
class DatasetSplits:
    """A dataset split into train and test images (float32 NHWC in [0, 1]); test is never trained on."""

    dataset_id: str
    train: NDArray[np.float32]
    test: NDArray[np.float32]
    fingerprint: str

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(H, W, C) of one image."""
        height, width, channels = self.train.shape[1:]
        return int(height), int(width), int(channels)


def upload_test_count(count: int) -> int:
    """How many of `count` uploaded images are held out for testing: 10%, at least 1, at most 512."""
    if count < MIN_UPLOAD_IMAGES:
        raise InvalidDataset(
            f"A dataset needs images to train and to test on. Expected at least {MIN_UPLOAD_IMAGES} images. "
            f"Received: count={count}"
        )
    return int(min(max(1, round(count * UPLOAD_TEST_FRACTION)), UPLOAD_MAX_TEST_IMAGES, count - 1))


def split_train_test(images: NDArray[np.float32], seed: int) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    """Seeded train/test split of uploaded images (test size from upload_test_count); deterministic per seed."""
    test_count = upload_test_count(len(images))
    order = np.random.default_rng(seed).permutation(len(images))
    test_indices = np.sort(order[:test_count])
    train_indices = np.sort(order[test_count:])
    return images[train_indices], images[test_indices]


def subset_train(train: NDArray[Any], max_train_images: int | None, seed: int) -> NDArray[Any]:
    """At most `max_train_images` training images: a seeded random subset (kept in original order)."""
    if max_train_images is None or max_train_images >= len(train):
        return train
    if max_train_images < 1:
        raise ValueError(f"Expected max_train_images >= 1. Received: max_train_images={max_train_images}")
    chosen = np.random.default_rng(seed).choice(len(train), size=max_train_images, replace=False)
    return train[np.sort(chosen)]


def to_unit_float(pixels: NDArray[Any], pixel_max: float) -> NDArray[np.float32]:
    """Pixels of 0..`pixel_max` -> float32 in [0, 1] (a fresh array), with a channel axis added to (N, H, W)."""
    images = pixels.astype(np.float32) / np.float32(pixel_max)
    return images[..., np.newaxis] if images.ndim == 3 else images
