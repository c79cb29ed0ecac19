"""IDX parsing and Fashion-MNIST from its IDX files, the store's cache or a download; mnist online only."""

from __future__ import annotations

import gzip
import struct
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from core.datasets import DatasetStore
from dae import data
from dae.data import idx
from dae.errors import DatasetUnavailable
from dae.fingerprints import fingerprint_pixels

REAL_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")


# ---------------------------------------------------------------------------------------------
# IDX / Fashion-MNIST
# ---------------------------------------------------------------------------------------------


def idx_bytes(array: np.ndarray, type_code: int = 0x08) -> bytes:
    header = bytes([0, 0, type_code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write_fashion_dir(directory: Path, train: np.ndarray, test: np.ndarray) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, pixels in (("train-images-idx3-ubyte.gz", train), ("t10k-images-idx3-ubyte.gz", test)):
        with gzip.open(directory / name, "wb") as handle:
            handle.write(idx_bytes(pixels))
    return directory


def test_parse_idx_reads_dims_big_endian_and_values() -> None:
    pixels = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    raw = idx_bytes(pixels)
    assert raw[:8] == b"\x00\x00\x08\x03\x00\x00\x00\x02"  # magic, then dim 0 = 2 as big-endian uint32
    np.testing.assert_array_equal(data.parse_idx(raw), pixels)
    shorts = np.array([[1, -2], [300, 4]], dtype=np.int16)
    np.testing.assert_array_equal(data.parse_idx(idx_bytes(shorts, type_code=0x0B)), shorts)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"\x01\x00\x08\x01\x00\x00\x00\x01\x05", "two zero bytes"),
        (b"\x00\x00\x07\x01\x00\x00\x00\x01\x05", "type code"),
        (b"\x00\x00\x08\x02\x00\x00\x00\x02\x00\x00\x00\x02\x01\x02\x03", "does not match its header"),
        (b"\x00\x00\x08\x00", "at least one dimension"),
    ],
)
def test_parse_idx_rejects_malformed_files(raw: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        data.parse_idx(raw)


def test_fashion_mnist_from_synthetic_idx_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, size=(20, 6, 5), dtype=np.uint8)
    test = rng.integers(0, 256, size=(4, 6, 5), dtype=np.uint8)
    train[0, 0, 0], train[0, 0, 1] = 255, 51
    directory = write_fashion_dir(tmp_path / "fashion", train, test)
    monkeypatch.setattr(idx, "FASHION_MNIST_DIR", directory)

    splits = data.load_dataset("fashion_mnist")
    assert splits.train.shape == (20, 6, 5, 1) and splits.test.shape == (4, 6, 5, 1)
    assert splits.train.dtype == np.float32 and splits.image_shape == (6, 5, 1)
    assert splits.train[0, 0, 0, 0] == 1.0 and splits.train[0, 0, 1, 0] == pytest.approx(0.2)
    np.testing.assert_array_equal(splits.test[..., 0], test.astype(np.float32) / 255.0)  # t10k is the test split
    assert splits.fingerprint == fingerprint_pixels(train, test)

    subset = data.load_dataset("fashion_mnist", seed=3, max_train_images=8)
    assert subset.train.shape == (8, 6, 5, 1)
    np.testing.assert_array_equal(subset.train, data.load_dataset("fashion_mnist", seed=3, max_train_images=8).train)
    assert not np.array_equal(subset.train, data.load_dataset("fashion_mnist", seed=4, max_train_images=8).train)
    train_rows = {row.tobytes() for row in splits.train}
    assert all(row.tobytes() in train_rows for row in subset.train)
    np.testing.assert_array_equal(subset.test, splits.test)  # the test split never shrinks


def test_fashion_mnist_falls_back_to_store_cache_then_reports_unavailable(
    tmp_path: Path, store_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(idx, "FASHION_MNIST_DIR", tmp_path / "no-such-dir")
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras-home"))
    store = DatasetStore(store_dir)

    # No IDX files, no cache, and a keras whose download fails (as on a machine without internet).
    def offline_load_data() -> None:
        raise OSError("network is unreachable")

    fake_keras = types.SimpleNamespace(
        datasets=types.SimpleNamespace(fashion_mnist=types.SimpleNamespace(load_data=offline_load_data))
    )
    monkeypatch.setitem(sys.modules, "keras", fake_keras)
    assert data.dataset_info("fashion_mnist", store).available is False
    with pytest.raises(DatasetUnavailable, match="needs a download from the internet"):
        data.load_dataset("fashion_mnist", store=store)

    cached_train = np.full((3, 4, 4), 255, dtype=np.uint8)
    cached_test = np.zeros((2, 4, 4), dtype=np.uint8)
    store.cache_dir.mkdir(parents=True)
    np.savez(store.cache_dir / "fashion_mnist.npz", x_train=cached_train, x_test=cached_test)
    assert data.dataset_info("fashion_mnist", store).available is True
    splits = data.load_dataset("fashion_mnist", store=store)
    assert splits.train.shape == (3, 4, 4, 1) and float(splits.train.min()) == 1.0
    assert splits.test.shape == (2, 4, 4, 1) and float(splits.test.max()) == 0.0


def test_mnist_is_online_only_with_a_clear_error(
    tmp_path: Path, store_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras-home"))

    def offline_load_data() -> None:
        raise OSError("network is unreachable")

    fake_keras = types.SimpleNamespace(
        datasets=types.SimpleNamespace(mnist=types.SimpleNamespace(load_data=offline_load_data))
    )
    monkeypatch.setitem(sys.modules, "keras", fake_keras)
    store = DatasetStore(store_dir)
    info = data.dataset_info("mnist", store)
    assert info.available is False and info.builtin and info.shape == [28, 28, 1]
    with pytest.raises(DatasetUnavailable, match=r"'mnist' needs a download.*network is unreachable"):
        data.load_dataset("mnist", store=store)


@pytest.mark.skipif(not REAL_FASHION_MNIST.exists(), reason="dataset-fashion-mnist is not installed")
def test_real_fashion_mnist_files() -> None:
    splits = data.load_dataset("fashion_mnist", max_train_images=100)
    assert splits.train.shape == (100, 28, 28, 1)
    assert splits.test.shape == (10_000, 28, 28, 1)
    assert 0.0 == float(splits.test.min()) and float(splits.test.max()) == 1.0
    info = data.dataset_info("fashion_mnist")
    assert info.available and info.count == 70_000 and info.fingerprint == splits.fingerprint
