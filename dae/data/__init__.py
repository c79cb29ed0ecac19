"""Datasets: built-ins that work offline, uploaded .npz/.zip datasets, validation and train/test splits.

Every dataset reaches the rest of the library as float32 images (N, H, W, C) in [0, 1], split into a train part
and a test part that training never sees (DatasetSplits).

Built-in datasets (one entry each in registry.BUILTIN_DATASETS) and their test splits:
- `fashion_mnist`: the canonical IDX files of the Debian package `dataset-fashion-mnist`
  (/usr/share/datasets/fashion-mnist); else a copy cached in the store; else `keras.datasets.fashion_mnist`
  (downloads; the copy is then cached in the store). Test split: the canonical t10k set (10,000 images).
- `mnist`: `keras.datasets.mnist` only (online; cached in the store once downloaded). Test split: t10k.
- `digits`: scikit-learn's bundled 8x8 digits scaled by 1/16. Test split: a fixed permutation (seed 0,
  independent of the job seed so every model is scored on the same images) keeps 297 for test, 1,500 for train.
- `natural_patches`: 32x32 grayscale patches cut at fixed random positions from images bundled in the
  scikit-image wheel. Split BY IMAGE, so no test patch shares pixels with a training patch: test patches come
  from camera, gravel and coffee (128 each); training patches from the other 11 images (1,024 each).

Uploaded datasets (ids "ds_..." in a DatasetSource such as core.datasets.DatasetStore): the test split is a seeded
random 10% of the images, at least 1 and at most 512, and at least one image stays for training (split_train_test).

Modules: registry (the built-in table, load_dataset, dataset_info, list_datasets), source (the DatasetSource
protocol), splits, idx (IDX files, Fashion-MNIST), online (keras.datasets downloads, cached), bundled (digits,
natural patches), uploads / png_zip / upload_limits (uploaded .npz and zips of PNGs, checked before decoding).
TensorFlow-free: keras is imported only to download an online dataset.
"""

from dae.data.bundled import (
    DIGITS_TEST_IMAGES,
    NATURAL_TEST_IMAGES,
    NATURAL_TRAIN_IMAGES,
    PATCH_SIDE,
    TEST_PATCHES_PER_IMAGE,
    TRAIN_PATCHES_PER_IMAGE,
)
from dae.data.idx import FASHION_MNIST_DIR, load_fashion_mnist_pixels, parse_idx, read_idx
from dae.data.registry import BUILTIN_DATASETS, BuiltinDataset, dataset_info, list_datasets, load_dataset
from dae.data.source import DatasetSource
from dae.data.splits import (
    MIN_UPLOAD_IMAGES,
    UPLOAD_MAX_TEST_IMAGES,
    UPLOAD_TEST_FRACTION,
    DatasetSplits,
    split_train_test,
    subset_train,
    upload_test_count,
)
from dae.data.upload_limits import (
    DEFAULT_MAX_DATASET_BYTES,
    NPZ_MAX_MEMBERS,
    ZIP_ENTRY_ALLOWANCE,
    UploadLimits,
    check_zip_entries,
    decoded_bytes,
)
from dae.data.uploads import parse_uploaded_dataset

__all__ = [
    "BUILTIN_DATASETS",
    "DEFAULT_MAX_DATASET_BYTES",
    "DIGITS_TEST_IMAGES",
    "FASHION_MNIST_DIR",
    "MIN_UPLOAD_IMAGES",
    "NATURAL_TEST_IMAGES",
    "NATURAL_TRAIN_IMAGES",
    "NPZ_MAX_MEMBERS",
    "PATCH_SIDE",
    "TEST_PATCHES_PER_IMAGE",
    "TRAIN_PATCHES_PER_IMAGE",
    "UPLOAD_MAX_TEST_IMAGES",
    "UPLOAD_TEST_FRACTION",
    "ZIP_ENTRY_ALLOWANCE",
    "BuiltinDataset",
    "DatasetSource",
    "DatasetSplits",
    "UploadLimits",
    "check_zip_entries",
    "dataset_info",
    "decoded_bytes",
    "list_datasets",
    "load_dataset",
    "load_fashion_mnist_pixels",
    "parse_idx",
    "parse_uploaded_dataset",
    "read_idx",
    "split_train_test",
    "subset_train",
    "upload_test_count",
]
