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

import functools
import gzip
import io
import logging
import os
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

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
#: Default ceiling on the decoded size of an upload (float32 values): 64 Mi values = 256 MiB.
DEFAULT_MAX_UPLOAD_VALUES = 64 * 1024 * 1024
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


def parse_uploaded_dataset(
    filename: str,
    content: bytes,
    *,
    max_images: int = 100_000,
    max_side: int = 512,
    max_values: int = DEFAULT_MAX_UPLOAD_VALUES,
) -> np.ndarray:
    """Validate and decode an uploaded dataset into float32 (N, H, W, C) in [0, 1], C in {1, 3}.

    Accepted: `.npz` (key "x" or its only array; (N,H,W) or (N,H,W,C) with C in {1,3}; uint8 0-255 or float in
    [0, 1]; no pickled objects) and `.zip` of PNG files of one size (grayscale or RGB; mixed sets become RGB).
    Sizes are checked from headers before anything is decompressed. Raises InvalidDataset or PayloadTooLarge.
    """
    lowered = (filename or "").lower()
    if not content:
        raise InvalidDataset(
            f"The uploaded file is empty. Expected a .npz or a .zip of PNGs. Received: filename={filename!r}, 0 bytes"
        )
    if lowered.endswith(".npz"):
        images = _parse_npz(content, filename, max_images, max_side, max_values)
    elif lowered.endswith(".zip"):
        images = _parse_png_zip(content, filename, max_images, max_side, max_values)
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


def _open_zip(content: bytes, filename: str) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(io.BytesIO(content))
    except (zipfile.BadZipFile, ValueError) as error:
        kind = "npz (a zip of .npy arrays)" if filename.lower().endswith(".npz") else "zip archive"
        raise InvalidDataset(f"Expected a valid {kind}. Received: {filename!r} ({error})") from None


def _check_image_dims(
    count: int, height: int, width: int, max_images: int, max_side: int, max_values: int, channels: int, filename: str
) -> None:
    if count > max_images:
        raise PayloadTooLarge(f"Too many images in {filename!r}. Expected at most {max_images}. Received: {count}")
    if min(height, width) < _MIN_IMAGE_SIDE:
        raise InvalidDataset(
            f"Images are too small. Expected height and width >= {_MIN_IMAGE_SIDE}. Received: {height}x{width}"
        )
    if max(height, width) > max_side:
        raise PayloadTooLarge(
            f"Images are too large. Expected height and width <= {max_side}. Received: {height}x{width}"
        )
    values = count * height * width * channels
    if values > max_values:
        raise PayloadTooLarge(
            f"The dataset is too large: {count} images of {height}x{width}x{channels} = {values} values. "
            f"Expected at most {max_values} values. Received: filename={filename!r}"
        )


def _parse_npz(content: bytes, filename: str, max_images: int, max_side: int, max_values: int) -> np.ndarray:
    archive = _open_zip(content, filename)
    members = {info.filename: info for info in archive.infolist() if not info.is_dir()}
    arrays = {name[: -len(".npy")]: info for name, info in members.items() if name.endswith(".npy")}
    if not arrays:
        raise InvalidDataset(f"Expected a .npz with at least one array. Received: members={sorted(members)[:10]}")
    if "x" in arrays:
        key = "x"
    elif len(arrays) == 1:
        key = next(iter(arrays))
    else:
        raise InvalidDataset(
            f"Cannot tell which array holds the images. Expected a key 'x' or exactly one array. "
            f"Received: keys={sorted(arrays)[:10]}"
        )
    info = arrays[key]
    # Read only the .npy header first: dtype and shape decide whether decompressing the data is safe.
    with archive.open(info) as handle:
        try:
            version = np.lib.format.read_magic(handle)
            read_header = (
                np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            )
            shape, _fortran_order, dtype = read_header(handle)
        except ValueError as error:
            if "allow_pickle" in str(error) or "object" in str(error).lower():
                raise InvalidDataset(
                    f"Pickled object arrays are refused. Expected a numeric array. Received: key={key!r}"
                ) from None
            raise InvalidDataset(f"Expected a valid .npy array under key {key!r}. Received: {error}") from None
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
        channels = 1
    elif len(shape) == 4 and shape[3] in (1, 3):
        channels = shape[3]
    else:
        raise InvalidDataset(
            f"Unsupported array shape. Expected (N, H, W) or (N, H, W, C) with C in {{1, 3}}. Received: key={key!r}, "
            f"shape={tuple(shape)}"
        )
    _check_image_dims(shape[0], shape[1], shape[2], max_images, max_side, max_values, channels, filename)
    expected_bytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if info.file_size > expected_bytes + 65536:
        raise InvalidDataset(
            f"The array file is larger than its header says. Expected about {expected_bytes} bytes. Received: "
            f"{info.file_size} bytes declared for key {key!r}"
        )
    try:
        with archive.open(info) as handle:
            pixels = np.lib.format.read_array(handle, allow_pickle=False)
    except (ValueError, EOFError, zipfile.BadZipFile, zlib.error) as error:
        raise InvalidDataset(f"Expected a readable array under key {key!r}. Received: {error}") from None
    if pixels.ndim == 3:
        pixels = pixels[..., np.newaxis]
    if pixels.dtype == np.uint8:
        return pixels.astype(np.float32) / np.float32(255.0)
    images = pixels.astype(np.float32)
    if not np.isfinite(images).all():
        bad = int(np.size(images) - np.isfinite(images).sum())
        raise InvalidDataset(f"Pixels must be finite. Expected no NaN or infinity. Received: {bad} non-finite values")
    low, high = float(images.min()), float(images.max())
    if low < 0.0 or high > 1.0:
        raise InvalidDataset(
            "Float pixels must lie in [0, 1] (uint8 arrays may use 0-255). Expected 0 <= x <= 1. "
            f"Received: min={low:g}, max={high:g}"
        )
    return images


_IGNORED_ZIP_ENTRIES = ("__MACOSX/", ".DS_Store", "Thumbs.db")
_GRAY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"}


def _ignored(name: str) -> bool:
    base = name.rsplit("/", 1)[-1]
    return name.startswith("__MACOSX/") or base.startswith("._") or base in _IGNORED_ZIP_ENTRIES


def _parse_png_zip(content: bytes, filename: str, max_images: int, max_side: int, max_values: int) -> np.ndarray:
    from PIL import Image  # noqa: PLC0415 - only uploads need PIL

    archive = _open_zip(content, filename)
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
    # Zip-bomb guard: a PNG is never much larger than its raw pixels (16-bit RGBA) plus chunk overhead;
    # declared sizes are checked before anything is decompressed, and reads are capped at the declared size.
    per_file_limit = max_side * max_side * 8 + 1024 * 1024
    total_declared = sum(info.file_size for info in entries)
    if total_declared > max_values * 8 + len(entries) * 1024 * 1024:
        raise PayloadTooLarge(
            f"The zip would expand to {total_declared} bytes. Expected at most {max_values * 8} bytes of PNGs. "
            f"Received: filename={filename!r}"
        )
    decoded: list[np.ndarray] = []
    first_size: tuple[int, int] | None = None
    any_color = False
    for info in entries:
        if info.file_size > per_file_limit:
            raise PayloadTooLarge(
                f"{info.filename!r} is too large. Expected a PNG of at most {per_file_limit} bytes. "
                f"Received: {info.file_size} bytes"
            )
        try:
            with archive.open(info) as handle:
                data = handle.read(per_file_limit + 1)
            image = Image.open(io.BytesIO(data))
            if image.format != "PNG":
                raise InvalidDataset(f"Expected PNG images. Received: {info.filename!r} is {image.format}")
            width, height = image.size
            if first_size is None:
                first_size = (height, width)
                _check_image_dims(len(entries), height, width, max_images, max_side, max_values, 3, filename)
            elif (height, width) != first_size:
                raise InvalidDataset(
                    f"All images must have the same size. Expected {first_size[0]}x{first_size[1]} (from "
                    f"{entries[0].filename!r}). Received: {height}x{width} in {info.filename!r}"
                )
            decoded.append(_png_pixels(image))
        except (InvalidDataset, PayloadTooLarge):
            raise
        except Exception as error:  # PIL raises many types for corrupt files (OSError, SyntaxError, ...)
            raise InvalidDataset(
                f"Expected a decodable PNG. Received: {info.filename!r} ({type(error).__name__}: {error})"
            ) from None
        any_color = any_color or decoded[-1].shape[-1] == 3
    if any_color:
        decoded = [pixels if pixels.shape[-1] == 3 else np.repeat(pixels, 3, axis=-1) for pixels in decoded]
    return np.stack(decoded).astype(np.float32, copy=False)


def _png_pixels(image) -> np.ndarray:
    """One PIL image -> float32 (H, W, 1) for grayscale or (H, W, 3) for colour, in [0, 1]; alpha dropped."""
    mode = image.mode
    if mode in ("I", "I;16", "I;16B", "I;16L"):
        # 16-bit grayscale PNGs decode to the I modes.
        return (np.asarray(image, dtype=np.float32) / np.float32(65535.0)).clip(0, 1)[..., np.newaxis]
    if mode in _GRAY_MODES:
        return (np.asarray(image.convert("L"), dtype=np.float32) / np.float32(255.0))[..., np.newaxis]
    return np.asarray(image.convert("RGB"), dtype=np.float32) / np.float32(255.0)
