"""Datasets: built-ins that work offline, uploaded .npz/.zip datasets, validation and train/test splits.

Every dataset reaches the rest of the library as float32 images (N, H, W, C) in [0, 1], split into a train part
and a test part that training never sees (DatasetSplits).

Built-in datasets and their test splits:
- `fashion_mnist`: the canonical IDX files of the Debian package `dataset-fashion-mnist`
  (/usr/share/datasets/fashion-mnist); else a copy cached in the store; else `keras.datasets.fashion_mnist`
  (downloads; the copy is then cached in the store). Test split: the canonical t10k set (10,000 images).
- `mnist`: `keras.datasets.mnist` only (online; cached in the store once downloaded). Test split: t10k.
- `digits`: scikit-learn's bundled 8x8 digits scaled by 1/16. Test split: a fixed permutation (seed 0,
  independent of the job seed so every model is scored on the same images) keeps 297 for test, 1,500 for train.
- `natural_patches`: 32x32 grayscale patches cut at fixed random positions from images bundled in the
  scikit-image wheel. Split BY IMAGE, so no test patch shares pixels with a training patch: test patches come
  from camera, gravel and coffee (128 each); training patches from the other 11 images (1,024 each).

Uploaded datasets (ids "ds_..." in the ModelStore): the test split is a seeded random 10% of the images, at least
1 and at most 512, and at least one image stays for training (see split_train_test).

TensorFlow-free: keras is imported only to download an online dataset.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import io
import logging
import math
import os
import struct
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING

import numpy as np

from dae.errors import DatasetNotFound, DatasetUnavailable, InvalidDataset, PayloadTooLarge
from dae.spec import DatasetInfo
from dae.store import atomic_write_bytes, fingerprint_pixels, is_dataset_id

if TYPE_CHECKING:
    from dae.store import ModelStore

logger = logging.getLogger(__name__)

#: Where the Debian package dataset-fashion-mnist installs the canonical IDX files. Tests point it elsewhere.
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")

#: Uploaded datasets: fraction of images held out for testing, and its bounds.
UPLOAD_TEST_FRACTION = 0.1
UPLOAD_MAX_TEST_IMAGES = 512
#: Uploads need one image to train on and one to test on.
MIN_UPLOAD_IMAGES = 2
#: Default of DAE_MAX_DATASET_MB: an upload decodes to at most 256 MiB of float32 pixels, the array the parser returns
#: and training loads (Fashion-MNIST's 70,000 28x28 images take 209 MiB).
DEFAULT_MAX_DATASET_BYTES = 256 * 1024 * 1024
#: Zip entries allowed beyond the image limit: folders and the __MACOSX/, .DS_Store files that are skipped.
ZIP_ENTRY_ALLOWANCE = 1024
#: Most members of an uploaded .npz (one per array; a dataset holds a handful).
NPZ_MAX_MEMBERS = 64
_MIN_IMAGE_SIDE = 3  # SSIM in the evaluation needs a 3x3 window

DIGITS_TEST_IMAGES = 297
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


@dataclass(frozen=True)
class DatasetSplits:
    """A dataset split into train and test images (float32 NHWC in [0, 1]); test is never trained on."""

    dataset_id: str
    train: np.ndarray
    test: np.ndarray
    fingerprint: str

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(H, W, C) of one image."""
        height, width, channels = self.train.shape[1:]
        return int(height), int(width), int(channels)


@dataclass(frozen=True)
class BuiltinDataset:
    """What the service knows about a built-in dataset without loading it."""

    description: str
    image_shape: tuple[int, int, int]
    train_count: int
    test_count: int
    needs_internet: bool


BUILTIN_DATASETS: dict[str, BuiltinDataset] = {
    "fashion_mnist": BuiltinDataset(
        "Fashion-MNIST (Zalando, MIT): 28x28 grayscale clothing images; canonical 60,000 train / 10,000 test.",
        (28, 28, 1),
        60_000,
        10_000,
        needs_internet=False,
    ),
    "mnist": BuiltinDataset(
        "MNIST handwritten digits, 28x28 grayscale; 60,000 train / 10,000 test. Downloaded via keras.datasets "
        "on first use (needs internet), then cached in the store.",
        (28, 28, 1),
        60_000,
        10_000,
        needs_internet=True,
    ),
    "digits": BuiltinDataset(
        "scikit-learn digits: 1,797 8x8 grayscale digits (scaled by 1/16); fixed 1,500 train / 297 test. Fast.",
        (8, 8, 1),
        1797 - DIGITS_TEST_IMAGES,
        DIGITS_TEST_IMAGES,
        needs_internet=False,
    ),
    "natural_patches": BuiltinDataset(
        f"{PATCH_SIDE}x{PATCH_SIDE} grayscale patches of natural images bundled with scikit-image; split by "
        f"image: test patches from {', '.join(NATURAL_TEST_IMAGES)}, train patches from the other "
        f"{len(NATURAL_TRAIN_IMAGES)} images.",
        (PATCH_SIDE, PATCH_SIDE, 1),
        len(NATURAL_TRAIN_IMAGES) * TRAIN_PATCHES_PER_IMAGE,
        len(NATURAL_TEST_IMAGES) * TEST_PATCHES_PER_IMAGE,
        needs_internet=False,
    ),
}

#: Fingerprints of built-ins computed in this process (dataset_info reports them once known).
_KNOWN_FINGERPRINTS: dict[str, str] = {}


# ---------------------------------------------------------------------------------------------
# Splits
# ---------------------------------------------------------------------------------------------


def upload_test_count(count: int) -> int:
    """How many of `count` uploaded images are held out for testing: 10%, at least 1, at most 512."""
    if count < MIN_UPLOAD_IMAGES:
        raise InvalidDataset(
            f"A dataset needs images to train and to test on. Expected at least {MIN_UPLOAD_IMAGES} images. "
            f"Received: count={count}"
        )
    return int(min(max(1, round(count * UPLOAD_TEST_FRACTION)), UPLOAD_MAX_TEST_IMAGES, count - 1))


def split_train_test(images: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded train/test split of uploaded images (test size from upload_test_count); deterministic per seed."""
    test_count = upload_test_count(len(images))
    order = np.random.default_rng(seed).permutation(len(images))
    test_indices = np.sort(order[:test_count])
    train_indices = np.sort(order[test_count:])
    return images[train_indices], images[test_indices]


def subset_train(train: np.ndarray, max_train_images: int | None, seed: int) -> np.ndarray:
    """At most `max_train_images` training images: a seeded random subset (kept in original order)."""
    if max_train_images is None or max_train_images >= len(train):
        return train
    if max_train_images < 1:
        raise ValueError(f"Expected max_train_images >= 1. Received: max_train_images={max_train_images}")
    chosen = np.random.default_rng(seed).choice(len(train), size=max_train_images, replace=False)
    return train[np.sort(chosen)]


def _to_unit_float(pixels: np.ndarray) -> np.ndarray:
    """uint8 (0-255) -> float32 in [0, 1] with a channel axis added to (N, H, W) input."""
    images = pixels.astype(np.float32) / np.float32(255.0)
    return images[..., np.newaxis] if images.ndim == 3 else images


# ---------------------------------------------------------------------------------------------
# IDX files (Fashion-MNIST)
# ---------------------------------------------------------------------------------------------

_IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def parse_idx(raw: bytes) -> np.ndarray:
    """Decode an (uncompressed) IDX file: 2 zero bytes, a type code, the number of dims, big-endian uint32 dims,
    then the values in big-endian, row-major order. ValueError when the bytes are not a consistent IDX file."""
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"Expected an IDX file starting with two zero bytes. Received: first bytes={raw[:4]!r}")
    type_code, ndim = raw[2], raw[3]
    if type_code not in _IDX_TYPES:
        raise ValueError(f"Expected an IDX type code in {sorted(_IDX_TYPES)}. Received: type_code={type_code:#04x}")
    header_size = 4 + 4 * ndim
    if ndim < 1 or len(raw) < header_size:
        raise ValueError(f"Expected an IDX header with at least one dimension. Received: ndim={ndim}, bytes={len(raw)}")
    dims = struct.unpack(f">{ndim}I", raw[4:header_size])
    dtype = np.dtype(_IDX_TYPES[type_code])
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header_size != expected:
        raise ValueError(
            f"IDX payload does not match its header dims {dims}. Expected {expected} bytes. "
            f"Received: {len(raw) - header_size} bytes"
        )
    values = np.frombuffer(raw, dtype=dtype, offset=header_size).reshape(dims)
    return values.astype(dtype.newbyteorder("="))


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file, gzip-compressed when its name ends in .gz."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        return parse_idx(handle.read())


@functools.lru_cache(maxsize=2)
def _read_fashion_mnist_dir(directory: str, stamp: tuple) -> tuple[np.ndarray, np.ndarray, str]:
    """(train uint8, test uint8, fingerprint) from the IDX files in `directory`; memoized per file stamp."""
    train = read_idx(Path(directory) / "train-images-idx3-ubyte.gz")
    test = read_idx(Path(directory) / "t10k-images-idx3-ubyte.gz")
    for part, pixels in (("train", train), ("t10k", test)):
        if pixels.dtype != np.uint8 or pixels.ndim != 3:
            raise ValueError(f"Expected {part} images as uint8 (N, H, W). Received: {pixels.dtype} {pixels.shape}")
    train.flags.writeable = False
    test.flags.writeable = False
    return train, test, fingerprint_pixels(train, test)


def _idx_stamp(directory: Path) -> tuple | None:
    stamps = []
    for name in ("train-images-idx3-ubyte.gz", "t10k-images-idx3-ubyte.gz"):
        try:
            status = os.stat(directory / name)
        except OSError:
            return None
        stamps.append((status.st_size, status.st_mtime_ns))
    return tuple(stamps)


def load_fashion_mnist_pixels(
    directory: Path | None = None, store: ModelStore | None = None
) -> tuple[np.ndarray, np.ndarray, str]:
    """Fashion-MNIST as (train uint8 (N,28,28), test uint8 (M,28,28), fingerprint).

    Source order: the IDX files in `directory` (default FASHION_MNIST_DIR), the store's cache, a download via
    keras.datasets (cached in the store). The returned arrays are read-only (they are shared by a memo).
    """
    directory = Path(directory) if directory is not None else FASHION_MNIST_DIR
    stamp = _idx_stamp(directory)
    if stamp is not None:
        try:
            return _read_fashion_mnist_dir(str(directory), stamp)
        except (OSError, ValueError, EOFError) as error:
            logger.warning("Fashion-MNIST IDX files in %s are unreadable (%s); trying the cache", directory, error)
    return _load_online_pixels("fashion_mnist", store)


# ---------------------------------------------------------------------------------------------
# Online datasets (keras.datasets), cached in the store
# ---------------------------------------------------------------------------------------------


def _online_cache_path(name: str, store: ModelStore | None) -> Path | None:
    return store.cache_dir / f"{name}.npz" if store is not None else None


def _keras_cache_has(name: str) -> bool:
    """Whether keras has this dataset in its own download cache (~/.keras/datasets), without importing keras."""
    keras_home = Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")) / "datasets"
    if name == "mnist":
        return (keras_home / "mnist.npz").is_file()
    return (keras_home / "fashion-mnist" / "t10k-images-idx3-ubyte.gz").is_file()


def _load_online_pixels(name: str, store: ModelStore | None) -> tuple[np.ndarray, np.ndarray, str]:
    cache_path = _online_cache_path(name, store)
    if cache_path is not None and cache_path.is_file():
        with np.load(cache_path, allow_pickle=False) as archive:
            train, test = archive["x_train"], archive["x_test"]
        return train, test, fingerprint_pixels(train, test)
    try:
        import keras  # noqa: PLC0415 - heavy (TensorFlow); only needed to download

        loader = getattr(keras.datasets, name)
        (train, _), (test, _) = loader.load_data()
    except Exception as error:  # network errors come in many types (URLError, HTTPError, OSError, ...)
        where = f" and no cached copy in {cache_path}" if cache_path is not None else ""
        raise DatasetUnavailable(
            f"Dataset {name!r} needs a download from the internet, which failed ({type(error).__name__}: {error}){where}. "
            f"Expected a machine with internet access or a cached copy. Received: dataset={name!r}"
        ) from error
    train = np.asarray(train, dtype=np.uint8)
    test = np.asarray(test, dtype=np.uint8)
    if cache_path is not None:
        buffer = io.BytesIO()
        np.savez(buffer, x_train=train, x_test=test)
        atomic_write_bytes(cache_path, buffer.getvalue())
        logger.info("cached %s in %s", name, cache_path)
    return train, test, fingerprint_pixels(train, test)


def _online_available(name: str, store: ModelStore | None) -> bool:
    cache_path = _online_cache_path(name, store)
    return (cache_path is not None and cache_path.is_file()) or _keras_cache_has(name)


# ---------------------------------------------------------------------------------------------
# digits and natural_patches
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _digits_pixels() -> tuple[np.ndarray, np.ndarray, str]:
    from sklearn.datasets import load_digits  # noqa: PLC0415 - sklearn import is slow; only when used

    # The bundled values are integers 0..16; uint8 is their exact source form (fingerprinted as such).
    source = load_digits().images.astype(np.uint8)
    order = np.random.default_rng(_DIGITS_SPLIT_SEED).permutation(len(source))
    test = source[np.sort(order[:DIGITS_TEST_IMAGES])]
    train = source[np.sort(order[DIGITS_TEST_IMAGES:])]
    return train, test, fingerprint_pixels(source)


def _bundled_gray_image(name: str) -> np.ndarray:
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
        return image.astype(np.float32)
    if image.ndim == 3:
        return skimage.color.rgb2gray(image[..., :3]).astype(np.float32)
    return (image.astype(np.float32) / np.float32(255.0)).clip(0, 1)


def _cut_patches(image: np.ndarray, count: int, name: str) -> np.ndarray:
    # Positions depend only on the image's name, so the set of patches of one image never changes.
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    rows = rng.integers(0, image.shape[0] - PATCH_SIDE + 1, size=count)
    cols = rng.integers(0, image.shape[1] - PATCH_SIDE + 1, size=count)
    windows = np.lib.stride_tricks.sliding_window_view(image, (PATCH_SIDE, PATCH_SIDE))
    return windows[rows, cols].copy()


@functools.lru_cache(maxsize=1)
def _natural_patches() -> tuple[np.ndarray, np.ndarray, str]:
    train = np.concatenate(
        [_cut_patches(_bundled_gray_image(name), TRAIN_PATCHES_PER_IMAGE, name) for name in NATURAL_TRAIN_IMAGES]
    )
    test = np.concatenate(
        [_cut_patches(_bundled_gray_image(name), TEST_PATCHES_PER_IMAGE, name) for name in NATURAL_TEST_IMAGES]
    )
    train.flags.writeable = False
    test.flags.writeable = False
    return train, test, fingerprint_pixels(train, test)


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


def _unknown_dataset(dataset_id: str) -> DatasetNotFound:
    return DatasetNotFound(
        f"Unknown dataset. Expected a built-in ({', '.join(sorted(BUILTIN_DATASETS))}) or an uploaded dataset id "
        f"('ds_' + 12 hex). Received: dataset={dataset_id!r}"
    )


def load_dataset(
    dataset_id: str,
    *,
    store: ModelStore | None = None,
    seed: int = 0,
    max_train_images: int | None = None,
) -> DatasetSplits:
    """Load a built-in or uploaded dataset as float32 NHWC train/test splits in [0, 1].

    `seed` picks the train/test split of uploaded datasets and the `max_train_images` subset; built-ins keep
    their fixed test split. Raises DatasetNotFound or DatasetUnavailable (online dataset, offline, no cache).
    """
    if max_train_images is not None and max_train_images < 1:
        raise ValueError(f"Expected max_train_images >= 1 or None. Received: max_train_images={max_train_images}")
    if dataset_id in ("fashion_mnist", "mnist", "digits", "natural_patches"):
        if dataset_id == "fashion_mnist":
            train, test, fingerprint = load_fashion_mnist_pixels(store=store)
        elif dataset_id == "mnist":
            train, test, fingerprint = _load_online_pixels("mnist", store)
        elif dataset_id == "digits":
            train, test, fingerprint = _digits_pixels()
        else:
            train, test, fingerprint = _natural_patches()
        _KNOWN_FINGERPRINTS[dataset_id] = fingerprint
        train = subset_train(train, max_train_images, seed)
        if dataset_id == "digits":
            train_images = (train.astype(np.float32) / np.float32(16.0))[..., np.newaxis]
            test_images = (test.astype(np.float32) / np.float32(16.0))[..., np.newaxis]
        elif dataset_id == "natural_patches":
            train_images = train[..., np.newaxis].astype(np.float32)  # copies: the memo stays untouched
            test_images = test[..., np.newaxis].astype(np.float32)
        else:
            train_images, test_images = _to_unit_float(train), _to_unit_float(test)
        return DatasetSplits(dataset_id, train_images, test_images, fingerprint)

    if not is_dataset_id(dataset_id):
        raise _unknown_dataset(dataset_id)
    if store is None:
        raise DatasetNotFound(
            f"Uploaded datasets live in the model store. Expected a store to load from. Received: store=None, "
            f"dataset={dataset_id!r}"
        )
    info = store.dataset_info(dataset_id)
    images = store.load_dataset_images(dataset_id)
    train, test = split_train_test(images, seed)
    train = subset_train(train, max_train_images, seed)
    return DatasetSplits(dataset_id, train, test, info.fingerprint or fingerprint_pixels(images))


def _builtin_available(dataset_id: str, store: ModelStore | None) -> bool:
    if dataset_id == "fashion_mnist":
        return _idx_stamp(FASHION_MNIST_DIR) is not None or _online_available("fashion_mnist", store)
    if dataset_id == "mnist":
        return _online_available("mnist", store)
    return True


def dataset_info(dataset_id: str, store: ModelStore | None = None) -> DatasetInfo:
    """What a dataset is (shape, counts, availability) without loading its pixels. DatasetNotFound otherwise."""
    builtin = BUILTIN_DATASETS.get(dataset_id)
    if builtin is not None:
        return DatasetInfo(
            id=dataset_id,
            builtin=True,
            description=builtin.description,
            count=builtin.train_count + builtin.test_count,
            shape=list(builtin.image_shape),
            available=_builtin_available(dataset_id, store),
            fingerprint=_KNOWN_FINGERPRINTS.get(dataset_id),
        )
    if not is_dataset_id(dataset_id) or store is None:
        raise _unknown_dataset(dataset_id)
    return store.dataset_info(dataset_id)


def list_datasets(store: ModelStore | None = None) -> list[DatasetInfo]:
    """Built-in datasets (in a fixed order) followed by uploaded ones (newest first)."""
    infos = [dataset_info(name, store) for name in BUILTIN_DATASETS]
    if store is not None:
        infos.extend(store.list_datasets())
    return infos


# ---------------------------------------------------------------------------------------------
# Uploads: .npz or .zip of PNGs
# ---------------------------------------------------------------------------------------------

_FLOAT32_BYTES = 4
#: The zip records read before zipfile is let loose on an upload (APPNOTE.TXT 4.3.14-4.3.16).
_EOCD = struct.Struct("<4s4H2LH")
_ZIP64_LOCATOR = struct.Struct("<4sLQL")
_ZIP64_EOCD = struct.Struct("<4sQ2H2L4Q")
_ZIP_COMMENT_WINDOW = 1 << 16  # a zip comment is at most 65,535 bytes
#: Bytes of a .npy member read at a time: the only allocation besides the float32 result.
_NPY_READ_CHUNK_BYTES = 4 * 1024 * 1024
#: What a PNG may hold besides its pixels (ICC profile, text chunks): per file, and on average in a zip.
_PNG_FILE_EXTRA_BYTES = 1024 * 1024
_PNG_AVERAGE_EXTRA_BYTES = 64 * 1024
#: The largest raw PNG pixel (16-bit RGBA) against the smallest decoded one (float32 gray).
_PNG_RAW_BYTES_PER_PIXEL = 8


@dataclass(frozen=True)
class UploadLimits:
    """The caps an upload is checked against, from its headers, before anything is decoded."""

    max_images: int = 100_000
    max_side: int = 512
    max_bytes: int = DEFAULT_MAX_DATASET_BYTES


def decoded_bytes(count: int, height: int, width: int, channels: int) -> int:
    """Bytes of `count` images decoded to float32 (N, H, W, C): the parser's result and what training loads."""
    return count * height * width * channels * _FLOAT32_BYTES


def parse_uploaded_dataset(
    filename: str,
    content: bytes,
    *,
    max_images: int = 100_000,
    max_side: int = 512,
    max_bytes: int = DEFAULT_MAX_DATASET_BYTES,
) -> np.ndarray:
    """Validate and decode an uploaded dataset into float32 (N, H, W, C) in [0, 1], C in {1, 3}.

    Accepted: `.npz` (key "x" or its only array; (N,H,W) or (N,H,W,C) with C in {1,3}; uint8 0-255 or float in
    [0, 1]; no pickled objects) and `.zip` of PNG files of one size (grayscale or RGB; mixed sets become RGB).
    Entry counts, declared sizes and the decoded size (`max_bytes` of float32) are checked from the zip directory
    and the array/PNG headers before anything is decompressed. Raises InvalidDataset or PayloadTooLarge.
    """
    lowered = (filename or "").lower()
    limits = UploadLimits(max_images, max_side, max_bytes)
    if not content:
        raise InvalidDataset(
            f"The uploaded file is empty. Expected a .npz or a .zip of PNGs. Received: filename={filename!r}, 0 bytes"
        )
    if lowered.endswith(".npz"):
        images = _parse_npz(content, filename, limits)
    elif lowered.endswith(".zip"):
        images = _parse_png_zip(content, filename, limits)
    else:
        raise InvalidDataset(
            f"Unsupported dataset file type. Expected a .npz file or a .zip of PNG images. Received: filename={filename!r}"
        )
    if len(images) < MIN_UPLOAD_IMAGES:
        raise InvalidDataset(
            f"A dataset needs images to train and to test on. Expected at least {MIN_UPLOAD_IMAGES} images. "
            f"Received: {len(images)} in {filename!r}"
        )
    return images


def _central_directory(content: bytes) -> tuple[int, int, int] | None:
    """(entries declared, start, end) of a zip's central directory, located the way zipfile locates it; None if
    there is no end-of-central-directory record."""
    position = len(content) - _EOCD.size
    if position < 0:
        return None
    # zipfile takes the last 22 bytes when they are a comment-less EOCD, else the last signature in the last 64 KiB.
    if not (content.startswith(b"PK\x05\x06", position) and content.endswith(b"\0\0")):
        position = content.rfind(b"PK\x05\x06", max(0, len(content) - _ZIP_COMMENT_WINDOW - _EOCD.size))
        if position < 0 or position + _EOCD.size > len(content):
            return None
    entries, size = _EOCD.unpack_from(content, position)[4:6]
    end = position
    locator, record = position - _ZIP64_LOCATOR.size, position - _ZIP64_LOCATOR.size - _ZIP64_EOCD.size
    if record >= 0 and content.startswith(b"PK\x06\x07", locator) and content.startswith(b"PK\x06\x06", record):
        # ZIP64 (more than 65,535 entries, or a large file): the real count and size live in the ZIP64 record.
        entries, size = _ZIP64_EOCD.unpack_from(content, record)[7:9]
        end = record
    return entries, max(0, end - size), end


def check_zip_entries(content: bytes, filename: str, max_entries: int, expected: str) -> None:
    """Refuse a zip with more than `max_entries` members before zipfile.ZipFile lists them."""
    # zipfile.ZipFile builds a ZipInfo for every member as it opens (200k empty members: 2.1 s, 117 MiB) before
    # anything could count them, so the count comes first from the end-of-central-directory record.
    directory = _central_directory(content)
    if directory is None:
        return  # not a zip: _open_zip says so
    declared, start, end = directory
    # zipfile reads records until the directory's byte size is used up, whatever the count field says: count those.
    entries = max(declared, content.count(b"PK\x01\x02", start, end))
    if entries > max_entries:
        raise PayloadTooLarge(
            f"Too many entries in {filename!r}. Expected {expected}. "
            f"Received: {entries:,} entries (from its end-of-central-directory record)"
        )


def _open_zip(content: bytes, filename: str) -> zipfile.ZipFile:
    """The upload as a ZipFile (after check_zip_entries: listing its members is then bounded)."""
    try:
        return zipfile.ZipFile(io.BytesIO(content))
    except (zipfile.BadZipFile, ValueError) as error:
        kind = "npz (a zip of .npy arrays)" if filename.lower().endswith(".npz") else "zip archive"
        raise InvalidDataset(f"Expected a valid {kind}. Received: {filename!r} ({error})") from None


def _check_image_dims(count: int, height: int, width: int, channels: int, limits: UploadLimits, filename: str) -> None:
    """Refuse from the headers' figures alone, before any pixel is decoded or allocated."""
    if count > limits.max_images:
        raise PayloadTooLarge(
            f"Too many images in {filename!r}. Expected at most {limits.max_images}. Received: {count}"
        )
    if min(height, width) < _MIN_IMAGE_SIDE:
        raise InvalidDataset(
            f"Images are too small. Expected height and width >= {_MIN_IMAGE_SIDE}. Received: {height}x{width}"
        )
    if max(height, width) > limits.max_side:
        raise PayloadTooLarge(
            f"Images are too large. Expected height and width <= {limits.max_side}. Received: {height}x{width}"
        )
    size = decoded_bytes(count, height, width, channels)
    if size > limits.max_bytes:
        raise PayloadTooLarge(
            f"The dataset is too large once decoded: {count} images of {height}x{width}x{channels} as float32 take "
            f"{size:,} bytes ({size / 2**20:,.1f} MiB). Expected at most {limits.max_bytes:,} bytes "
            f"({limits.max_bytes / 2**20:,.1f} MiB, DAE_MAX_DATASET_MB). Received: filename={filename!r}"
        )


@contextlib.contextmanager
def _member_errors(expected: str, name: str) -> Iterator[None]:
    """Turn what a corrupt zip member raises (zipfile, zlib, numpy and PIL use many types) into InvalidDataset."""
    from PIL import Image  # noqa: PLC0415 - only uploads need PIL

    try:
        yield
    except (InvalidDataset, PayloadTooLarge, MemoryError):
        raise
    except Image.DecompressionBombError as error:
        raise PayloadTooLarge(
            f"{name} is larger than Pillow's decompression-bomb guard allows. Expected {expected} of at most "
            f"{Image.MAX_IMAGE_PIXELS * 2:,} pixels. Received: {error}"
        ) from None
    except Image.UnidentifiedImageError:
        raise InvalidDataset(f"Expected {expected}. Received: {name}, which is not an image file") from None
    except Exception as error:
        raise InvalidDataset(f"Expected {expected}. Received: {name} ({type(error).__name__}: {error})") from None


def _parse_npz(content: bytes, filename: str, limits: UploadLimits) -> np.ndarray:
    """The images of a .npz: entry count, then the .npy header, then (only if both pass) the data."""
    check_zip_entries(content, filename, NPZ_MAX_MEMBERS, f"a .npz of at most {NPZ_MAX_MEMBERS} arrays")
    archive = _open_zip(content, filename)
    key, info = _npz_images_member(archive)
    with _member_errors("a readable .npy array", f"key {key!r}"), archive.open(info) as handle:
        # The .npy header first: shape and dtype decide whether reading the data is allowed at all.
        shape, fortran_order, dtype = _npy_header(handle, key)
        channels = _npz_channels(shape, dtype, key)
        _check_image_dims(shape[0], shape[1], shape[2], channels, limits, filename)
        expected_bytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if info.file_size > expected_bytes + 65536:
            raise InvalidDataset(
                f"The array file is larger than its header says. Expected about {expected_bytes} bytes. Received: "
                f"{info.file_size} bytes declared for key {key!r}"
            )
        images = _read_npy_as_float32(handle, shape, fortran_order, dtype, key)
    if dtype != np.uint8:
        _check_unit_range(images)
    return images.reshape(*shape[:3], channels)


def _npz_images_member(archive: zipfile.ZipFile) -> tuple[str, zipfile.ZipInfo]:
    """The key and member holding the images: "x", else the only array."""
    members = {info.filename: info for info in archive.infolist() if not info.is_dir()}
    arrays = {name[: -len(".npy")]: info for name, info in members.items() if name.endswith(".npy")}
    if not arrays:
        raise InvalidDataset(f"Expected a .npz with at least one array. Received: members={sorted(members)[:10]}")
    if "x" in arrays:
        return "x", arrays["x"]
    if len(arrays) == 1:
        return next(iter(arrays.items()))
    raise InvalidDataset(
        f"Cannot tell which array holds the images. Expected a key 'x' or exactly one array. "
        f"Received: keys={sorted(arrays)[:10]}"
    )


def _npy_header(handle: IO[bytes], key: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran_order, dtype) from a .npy header, reading nothing of the data."""
    readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    try:
        version = np.lib.format.read_magic(handle)
        if version not in readers:
            raise InvalidDataset(
                f"Unsupported .npy format version. Expected 1.0 or 2.0. Received: key={key!r}, version={version}"
            )
        shape, fortran_order, dtype = readers[version](handle)
    except ValueError as error:
        if "allow_pickle" in str(error) or "object" in str(error).lower():
            raise InvalidDataset(
                f"Pickled object arrays are refused. Expected a numeric array. Received: key={key!r}"
            ) from None
        raise InvalidDataset(f"Expected a valid .npy array under key {key!r}. Received: {error}") from None
    return tuple(int(side) for side in shape), bool(fortran_order), dtype


def _npz_channels(shape: tuple[int, ...], dtype: np.dtype, key: str) -> int:
    """The channel count of a (N,H,W) or (N,H,W,C) pixel array; InvalidDataset for any other dtype or shape."""
    if dtype.hasobject:
        raise InvalidDataset(
            f"Pickled object arrays are refused. Expected uint8 or float pixels. Received: key={key!r}, dtype={dtype}"
        )
    if dtype != np.uint8 and dtype.kind != "f":
        raise InvalidDataset(
            f"Unsupported pixel type. Expected uint8 (0-255) or float (0-1). Received: key={key!r}, dtype={dtype}"
            + (" (convert with .astype(np.uint8) if the values are 0-255)" if dtype.kind in "iub" else "")
        )
    if len(shape) == 3:
        return 1
    if len(shape) == 4 and shape[3] in (1, 3):
        return shape[3]
    raise InvalidDataset(
        f"Unsupported array shape. Expected (N, H, W) or (N, H, W, C) with C in {{1, 3}}. Received: key={key!r}, "
        f"shape={shape}"
    )


def _read_npy_as_float32(
    handle: IO[bytes], shape: tuple[int, ...], fortran_order: bool, dtype: np.dtype, key: str
) -> np.ndarray:
    """The array's values read in chunks straight into float32 (uint8 scaled by 1/255): the result is the only
    large allocation, whatever the source dtype."""
    images = np.empty(shape[::-1] if fortran_order else shape, np.float32)
    flat = images.reshape(-1)
    step = max(1, _NPY_READ_CHUNK_BYTES // dtype.itemsize)
    for start in range(0, flat.size, step):
        count = min(step, flat.size - start)
        raw = handle.read(count * dtype.itemsize)
        if len(raw) != count * dtype.itemsize:
            raise InvalidDataset(
                f"The array under key {key!r} is truncated. Expected {flat.size * dtype.itemsize} bytes of data. "
                f"Received: {start * dtype.itemsize + len(raw)}"
            )
        values = np.frombuffer(raw, dtype=dtype)
        if dtype == np.uint8:
            np.divide(values, np.float32(255.0), out=flat[start : start + count])
        else:
            flat[start : start + count] = values
    # Fortran order: the file holds the transpose's rows (what numpy.lib.format.read_array does too).
    return np.ascontiguousarray(images.T) if fortran_order else images


def _check_unit_range(images: np.ndarray) -> None:
    """InvalidDataset unless every value is finite and in [0, 1]."""
    low, high = float(images.min()), float(images.max())  # NaN propagates through min/max: no mask needed
    if not (math.isfinite(low) and math.isfinite(high)):
        bad = int(images.size - np.count_nonzero(np.isfinite(images)))
        raise InvalidDataset(f"Pixels must be finite. Expected no NaN or infinity. Received: {bad} non-finite values")
    if low < 0.0 or high > 1.0:
        raise InvalidDataset(
            "Float pixels must lie in [0, 1] (uint8 arrays may use 0-255). Expected 0 <= x <= 1. "
            f"Received: min={low:g}, max={high:g}"
        )


_IGNORED_ZIP_ENTRIES = ("__MACOSX/", ".DS_Store", "Thumbs.db")
_GRAY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"}


def _ignored(name: str) -> bool:
    base = name.rsplit("/", 1)[-1]
    return name.startswith("__MACOSX/") or base.startswith("._") or base in _IGNORED_ZIP_ENTRIES


def _parse_png_zip(content: bytes, filename: str, limits: UploadLimits) -> np.ndarray:
    """The images of a zip of PNGs: entry count, declared sizes, every IHDR, then one allocation and the decoding."""
    check_zip_entries(
        content,
        filename,
        limits.max_images + ZIP_ENTRY_ALLOWANCE,
        f"at most {limits.max_images:,} PNGs (DAE_MAX_DATASET_IMAGES) plus {ZIP_ENTRY_ALLOWANCE:,} other entries",
    )
    archive = _open_zip(content, filename)
    entries = _png_entries(archive, filename, limits.max_images)
    _check_declared_png_sizes(entries, limits, filename)
    headers = [_png_header(archive, info) for info in entries]
    height, width, channels = _common_png_shape(entries, headers)
    _check_image_dims(len(entries), height, width, channels, limits, filename)
    images = np.empty((len(entries), height, width, channels), np.float32)
    file_limit = _png_file_limit(limits)
    for index, info in enumerate(entries):
        _decode_png_into(images[index], archive, info, file_limit)
    return images


def _png_entries(archive: zipfile.ZipFile, filename: str, max_images: int) -> list[zipfile.ZipInfo]:
    """The zip's PNG members sorted by name (skipped: folders and macOS/Windows metadata files)."""
    entries = sorted(
        (info for info in archive.infolist() if not info.is_dir() and not _ignored(info.filename)),
        key=lambda info: info.filename,
    )
    others = [info.filename for info in entries if not info.filename.lower().endswith(".png")]
    if others:
        raise InvalidDataset(f"Expected a zip of .png files only. Received: other files {others[:5]}")
    if not entries:
        raise InvalidDataset(f"Expected a zip with at least one .png file. Received: no PNGs in {filename!r}")
    if len(entries) > max_images:
        raise PayloadTooLarge(
            f"Too many images in {filename!r}. Expected at most {max_images}. Received: {len(entries)}"
        )
    return entries


def _png_file_limit(limits: UploadLimits) -> int:
    """The most bytes a PNG of the largest allowed size can take (raw 16-bit RGBA pixels plus metadata chunks)."""
    return limits.max_side * limits.max_side * _PNG_RAW_BYTES_PER_PIXEL + _PNG_FILE_EXTRA_BYTES


def _check_declared_png_sizes(entries: list[zipfile.ZipInfo], limits: UploadLimits, filename: str) -> None:
    """Zip-bomb guard: refuse members whose declared (uncompressed) sizes no honest PNG set within the limits has,
    before any is inflated; zipfile never inflates a member past its declared size."""
    per_file_limit = _png_file_limit(limits)
    for info in entries:
        if info.file_size > per_file_limit:
            raise PayloadTooLarge(
                f"{info.filename!r} is too large. Expected a PNG of at most {per_file_limit} bytes. "
                f"Received: {info.file_size} bytes"
            )
    total_declared = sum(info.file_size for info in entries)
    total_limit = (
        limits.max_bytes * _PNG_RAW_BYTES_PER_PIXEL // _FLOAT32_BYTES + len(entries) * _PNG_AVERAGE_EXTRA_BYTES
    )
    if total_declared > total_limit:
        raise PayloadTooLarge(
            f"The zip would expand to {total_declared:,} bytes. Expected at most {total_limit:,} bytes of PNGs "
            f"(DAE_MAX_DATASET_MB). Received: filename={filename!r}"
        )


def _png_header(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> tuple[int, int, int]:
    """(height, width, channels) from a PNG's IHDR: Image.open is lazy and inflates only the chunks before the pixels."""
    from PIL import Image  # noqa: PLC0415 - only uploads need PIL

    with (
        _member_errors("a decodable PNG", repr(info.filename)),
        archive.open(info) as handle,
        Image.open(handle) as image,
    ):
        if image.format != "PNG":
            raise InvalidDataset(f"Expected PNG images. Received: {info.filename!r} is {image.format}")
        width, height = image.size
        return height, width, 1 if image.mode in _GRAY_MODES else 3


def _common_png_shape(entries: list[zipfile.ZipInfo], headers: list[tuple[int, int, int]]) -> tuple[int, int, int]:
    """(H, W, C) shared by every PNG: C is 3 when any image is in colour (the gray ones are replicated)."""
    height, width, _ = headers[0]
    for info, (other_height, other_width, _) in zip(entries, headers, strict=True):
        if (other_height, other_width) != (height, width):
            raise InvalidDataset(
                f"All images must have the same size. Expected {height}x{width} (from {entries[0].filename!r}). "
                f"Received: {other_height}x{other_width} in {info.filename!r}"
            )
    return height, width, max(channels for _, _, channels in headers)


def _decode_png_into(target: np.ndarray, archive: zipfile.ZipFile, info: zipfile.ZipInfo, file_limit: int) -> None:
    """Decode one PNG member into its (H, W, C) slot of the result (a gray image broadcasts to RGB)."""
    from PIL import Image  # noqa: PLC0415 - only uploads need PIL

    with _member_errors("a decodable PNG", repr(info.filename)):
        with archive.open(info) as handle:
            data = handle.read(file_limit + 1)
        with Image.open(io.BytesIO(data)) as image:
            target[...] = _png_pixels(image)


def _png_pixels(image) -> np.ndarray:
    """One PIL image -> float32 (H, W, 1) for grayscale or (H, W, 3) for colour, in [0, 1]; alpha dropped."""
    mode = image.mode
    if mode in ("I", "I;16", "I;16B", "I;16L"):
        # 16-bit grayscale PNGs decode to the I modes.
        return (np.asarray(image, dtype=np.float32) / np.float32(65535.0)).clip(0, 1)[..., np.newaxis]
    if mode in _GRAY_MODES:
        return (np.asarray(image.convert("L"), dtype=np.float32) / np.float32(255.0))[..., np.newaxis]
    return np.asarray(image.convert("RGB"), dtype=np.float32) / np.float32(255.0)
