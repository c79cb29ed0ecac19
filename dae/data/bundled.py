"""Built-ins whose pixels ship inside installed wheels: scikit-learn's digits, scikit-image's natural images.

- `digits`: scikit-learn's bundled 8x8 digits (integers 0..16). Test split: a fixed permutation (seed 0,
  independent of the job seed so every model is scored on the same images) keeps 297 for test, 1,500 for train.
- `natural_patches`: 32x32 grayscale patches cut at fixed random positions from images bundled in the
  scikit-image wheel. Split BY IMAGE, so no test patch shares pixels with a training patch: test patches come
  from camera, gravel and coffee (128 each); training patches from the other 11 images (1,024 each).
"""

from __future__ import annotations

import functools
import zlib

import numpy as np
from numpy.typing import NDArray

from dae.data.online import PixelSplits
from dae.errors import DatasetUnavailable
from dae.fingerprints import fingerprint_pixels

DIGITS_TEST_IMAGES = 297
DIGITS_IMAGES = 1797
_DIGITS_SPLIT_SEED = 0

PATCH_SIDE = 32
NATURAL_TRAIN_IMAGES = (
    "astronaut",
    "coins",
    "moon",
    "brick",
    "grass",
    "page",
    "text",
    "clock",
    "horse",
    "chelsea",
    "rocket",
)
NATURAL_TEST_IMAGES = ("camera", "gravel", "coffee")
TRAIN_PATCHES_PER_IMAGE = 1024
TEST_PATCHES_PER_IMAGE = 128


@functools.lru_cache(maxsize=1)
def digits_pixels() -> PixelSplits:
    """(train uint8 0..16 (1500, 8, 8), test (297, 8, 8), fingerprint of the source); memoized."""
    from sklearn.datasets import load_digits  # noqa: PLC0415 - sklearn import is slow; only when used

    # The bundled values are integers 0..16; uint8 is their exact source form (fingerprinted as such).
    source = load_digits().images.astype(np.uint8)
    order = np.random.default_rng(_DIGITS_SPLIT_SEED).permutation(len(source))
    test = source[np.sort(order[:DIGITS_TEST_IMAGES])]
    train = source[np.sort(order[DIGITS_TEST_IMAGES:])]
    return train, test, fingerprint_pixels(source)


def bundled_gray_image(name: str) -> NDArray[np.float32]:
    """A scikit-image bundled image as float32 grayscale in [0, 1]."""
    import skimage.color  # noqa: PLC0415
    import skimage.data  # noqa: PLC0415

    try:
        image = getattr(skimage.data, name)()
    except Exception as error:  # a wheel without the file would try to download it
        raise DatasetUnavailable(
            f"natural_patches needs the image {name!r} bundled with scikit-image, which could not be loaded "
            f"({type(error).__name__}: {error}). Expected scikit-image's wheel with its bundled data. "
            f"Received: image={name!r}"
        ) from error
    if image.dtype == bool:
        return np.asarray(image, dtype=np.float32)
    if image.ndim == 3:
        return np.asarray(skimage.color.rgb2gray(image[..., :3]), dtype=np.float32)
    return np.asarray((image.astype(np.float32) / np.float32(255.0)).clip(0, 1), dtype=np.float32)


def _cut_patches(image: NDArray[np.float32], count: int, name: str) -> NDArray[np.float32]:
    # Positions depend only on the image's name, so the set of patches of one image never changes.
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    rows = rng.integers(0, image.shape[0] - PATCH_SIDE + 1, size=count)
    cols = rng.integers(0, image.shape[1] - PATCH_SIDE + 1, size=count)
    windows = np.lib.stride_tricks.sliding_window_view(image, (PATCH_SIDE, PATCH_SIDE))
    return windows[rows, cols].copy()


@functools.lru_cache(maxsize=1)
def natural_patches_pixels() -> PixelSplits:
    """(train float32 (11·1024, 32, 32), test float32 (3·128, 32, 32), fingerprint); memoized, read-only."""
    train = np.concatenate(
        [_cut_patches(bundled_gray_image(name), TRAIN_PATCHES_PER_IMAGE, name) for name in NATURAL_TRAIN_IMAGES]
    )
    test = np.concatenate(
        [_cut_patches(bundled_gray_image(name), TEST_PATCHES_PER_IMAGE, name) for name in NATURAL_TEST_IMAGES]
    )
    train.flags.writeable = False
    test.flags.writeable = False
    return train, test, fingerprint_pixels(train, test)
