"""The built-in registry: digits and natural_patches (shapes, ranges, determinism, disjoint splits), splits, info, listing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from core.datasets import DatasetStore
from dae import data
from dae.data import bundled
from dae.errors import DatasetNotFound

# ---------------------------------------------------------------------------------------------
# digits and natural_patches
# ---------------------------------------------------------------------------------------------


def test_digits_shapes_range_determinism_and_partition() -> None:
    from sklearn.datasets import load_digits

    splits = data.load_dataset("digits")
    assert splits.train.shape == (1500, 8, 8, 1) and splits.test.shape == (297, 8, 8, 1)
    assert float(splits.train.min()) == 0.0 and float(splits.train.max()) == 1.0
    again = data.load_dataset("digits", seed=123)  # the job seed does not move the fixed test split
    np.testing.assert_array_equal(splits.test, again.test)
    np.testing.assert_array_equal(splits.train, again.train)
    # train + test is exactly the source, each image used once (a partition, so no test image is trained on).
    source = (load_digits().images / 16.0).astype(np.float32)
    combined = np.concatenate([splits.train, splits.test])[..., 0]
    assert sorted(image.tobytes() for image in combined) == sorted(image.tobytes() for image in source)


def test_natural_patches_shapes_determinism_and_split_by_image() -> None:
    splits = data.load_dataset("natural_patches")
    assert splits.train.shape == (11 * 1024, 32, 32, 1) and splits.test.shape == (3 * 128, 32, 32, 1)
    assert splits.train.dtype == np.float32
    assert 0.0 <= float(splits.train.min()) and float(splits.train.max()) <= 1.0
    assert float(splits.test.std()) > 0.05  # real image content, not blank patches
    bundled.natural_patches_pixels.cache_clear()  # regenerate from the images, not from the memo
    again = data.load_dataset("natural_patches")
    np.testing.assert_array_equal(splits.train, again.train)
    np.testing.assert_array_equal(splits.test, again.test)
    assert splits.fingerprint == again.fingerprint
    # Split by image: test patches come from camera, gravel and coffee only (in that order, 128 each).
    import skimage.data

    camera = skimage.data.camera().astype(np.float32) / 255.0
    first = splits.test[0, ..., 0]
    windows = np.lib.stride_tricks.sliding_window_view(camera, (32, 32))
    assert np.any(np.all(windows == first, axis=(2, 3)))
    train_patches = {patch.tobytes() for patch in splits.train}
    assert not any(patch.tobytes() in train_patches for patch in splits.test)


def test_natural_patches_uses_only_bundled_images() -> None:
    assert set(data.NATURAL_TRAIN_IMAGES).isdisjoint(data.NATURAL_TEST_IMAGES)
    import inspect
    import re

    import skimage.data

    bundled_dir = Path(skimage.data.__file__).parent
    for name in data.NATURAL_TRAIN_IMAGES + data.NATURAL_TEST_IMAGES:
        # Each loader names its file as "data/<file>"; a file shipped in the wheel needs no download.
        files = re.findall(r'"data/([^"]+)"', inspect.getsource(getattr(skimage.data, name)))
        assert files, f"cannot tell which file skimage.data.{name} loads"
        assert all((bundled_dir / file).is_file() for file in files), f"{name} ({files}) is not in the wheel"


# ---------------------------------------------------------------------------------------------
# Splits, info, listing
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("count", "expected"), [(2, 1), (9, 1), (10, 1), (15, 2), (100, 10), (6000, 512)])
def test_upload_test_count(count: int, expected: int) -> None:
    assert data.upload_test_count(count) == expected


def test_upload_split_is_seeded_and_disjoint(store_dir: Path) -> None:
    store = DatasetStore(store_dir)
    images = (np.arange(50, dtype=np.uint8)[:, None, None, None] * np.ones((1, 4, 4, 1), dtype=np.uint8)).astype(
        np.float32
    ) / 255.0
    info = store.save(images, filename="ramp.npz")
    splits = data.load_dataset(info.id, store=store, seed=1)
    assert splits.train.shape == (45, 4, 4, 1) and splits.test.shape == (5, 4, 4, 1)
    train_ids = set(np.round(splits.train[:, 0, 0, 0] * 255).astype(int))
    test_ids = set(np.round(splits.test[:, 0, 0, 0] * 255).astype(int))
    assert train_ids.isdisjoint(test_ids) and train_ids | test_ids == set(range(50))
    same = data.load_dataset(info.id, store=store, seed=1)
    np.testing.assert_array_equal(same.test, splits.test)
    other = data.load_dataset(info.id, store=store, seed=2)
    assert not np.array_equal(other.test, splits.test)
    assert splits.fingerprint == info.fingerprint
    small = data.load_dataset(info.id, store=store, seed=1, max_train_images=10)
    assert small.train.shape[0] == 10 and set(np.round(small.train[:, 0, 0, 0] * 255).astype(int)) <= train_ids


def test_unknown_or_unsafe_dataset_ids(store_dir: Path) -> None:
    store = DatasetStore(store_dir)
    for dataset_id in ("imagenet", "../etc/passwd", "ds_0123456789ab", "ds_../x"):
        with pytest.raises(DatasetNotFound):
            data.load_dataset(dataset_id, store=store)
        with pytest.raises(DatasetNotFound):
            data.dataset_info(dataset_id, store)
    with pytest.raises(DatasetNotFound, match="store"):
        data.load_dataset("ds_0123456789ab")


def test_dataset_info_and_listing_are_cheap_and_complete(store_dir: Path) -> None:
    store = DatasetStore(store_dir)
    info = data.dataset_info("natural_patches", store)
    assert info.shape == [32, 32, 1] and info.count == 11 * 1024 + 3 * 128 and info.available
    assert data.dataset_info("digits").shape == [8, 8, 1]
    upload = store.save(np.zeros((3, 5, 6, 3), dtype=np.float32), filename="zeros.npz")
    listed = data.list_datasets(store)
    assert [entry.id for entry in listed[:4]] == list(data.BUILTIN_DATASETS)
    assert listed[-1].id == upload.id and listed[-1].shape == [5, 6, 3] and not listed[-1].builtin
    assert data.dataset_info(upload.id, store) == upload
