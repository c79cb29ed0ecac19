"""The built-in datasets, in one table, and the public entry points that serve built-ins and uploads alike.

Adding a built-in dataset is one BuiltinDataset entry in BUILTIN_DATASETS: its pixel loader, the value that maps
to 1.0, what the service shows without loading it, and (for one that may need a download) its availability check.
Uploaded datasets ("ds_..." ids) come from a DatasetSource (core.datasets.DatasetStore in the service and worker).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from dae.data import bundled, idx, online
from dae.data.online import PixelSplits
from dae.data.source import DatasetSource
from dae.data.splits import DatasetSplits, split_train_test, subset_train, to_unit_float
from dae.errors import DatasetNotFound
from dae.fingerprints import fingerprint_pixels
from dae.spec import DatasetInfo, is_dataset_id

#: Loads a built-in's pixels (train, test, fingerprint); the source holds the cache of downloaded copies.
PixelLoader = Callable[[DatasetSource | None], PixelSplits]
#: Whether a built-in loads without a download, given the source whose cache may hold a copy.
AvailabilityCheck = Callable[[DatasetSource | None], bool]


@dataclass(frozen=True)
class BuiltinDataset:
    """A built-in dataset: how to load it and what the service knows about it without loading it.

    `load` returns (train, test, fingerprint) pixels with values 0..`pixel_max` ((N, H, W) grayscale or
    (N, H, W, C)); `available` is None for datasets that ship with installed packages (always available).
    """

    description: str
    image_shape: tuple[int, int, int]
    train_count: int
    test_count: int
    needs_internet: bool
    load: PixelLoader
    pixel_max: float = 255.0
    available: AvailabilityCheck | None = None


def _offline(load: Callable[[], PixelSplits]) -> PixelLoader:
    """A loader of pixels bundled in a wheel: no cache, so the source goes unused."""

    def loader(store: DatasetSource | None) -> PixelSplits:
        del store  # nothing to cache: the pixels are installed
        return load()

    return loader


def _load_fashion_mnist(store: DatasetSource | None) -> PixelSplits:
    return idx.load_fashion_mnist_pixels(store=store)


def _load_mnist(store: DatasetSource | None) -> PixelSplits:
    return online.load_online_pixels("mnist", store)


def _mnist_available(store: DatasetSource | None) -> bool:
    return online.online_available("mnist", store)


BUILTIN_DATASETS: dict[str, BuiltinDataset] = {
    "fashion_mnist": BuiltinDataset(
        "Fashion-MNIST (Zalando, MIT): 28x28 grayscale clothing images; canonical 60,000 train / 10,000 test.",
        (28, 28, 1),
        60_000,
        10_000,
        needs_internet=False,
        load=_load_fashion_mnist,
        available=idx.fashion_mnist_available,
    ),
    "mnist": BuiltinDataset(
        "MNIST handwritten digits, 28x28 grayscale; 60,000 train / 10,000 test. Downloaded via keras.datasets "
        "on first use (needs internet), then cached in the store.",
        (28, 28, 1),
        60_000,
        10_000,
        needs_internet=True,
        load=_load_mnist,
        available=_mnist_available,
    ),
    "digits": BuiltinDataset(
        "scikit-learn digits: 1,797 8x8 grayscale digits (scaled by 1/16); fixed 1,500 train / 297 test. Fast.",
        (8, 8, 1),
        bundled.DIGITS_IMAGES - bundled.DIGITS_TEST_IMAGES,
        bundled.DIGITS_TEST_IMAGES,
        needs_internet=False,
        load=_offline(bundled.digits_pixels),
        pixel_max=16.0,
    ),
    "natural_patches": BuiltinDataset(
        f"{bundled.PATCH_SIDE}x{bundled.PATCH_SIDE} grayscale patches of natural images bundled with scikit-image; "
        f"split by image: test patches from {', '.join(bundled.NATURAL_TEST_IMAGES)}, train patches from the other "
        f"{len(bundled.NATURAL_TRAIN_IMAGES)} images.",
        (bundled.PATCH_SIDE, bundled.PATCH_SIDE, 1),
        len(bundled.NATURAL_TRAIN_IMAGES) * bundled.TRAIN_PATCHES_PER_IMAGE,
        len(bundled.NATURAL_TEST_IMAGES) * bundled.TEST_PATCHES_PER_IMAGE,
        needs_internet=False,
        load=_offline(bundled.natural_patches_pixels),
        pixel_max=1.0,
    ),
}

#: Fingerprints of built-ins computed in this process (dataset_info reports them once known).
_KNOWN_FINGERPRINTS: dict[str, str] = {}


def _unknown_dataset(dataset_id: str) -> DatasetNotFound:
    return DatasetNotFound(
        f"Unknown dataset. Expected a built-in ({', '.join(sorted(BUILTIN_DATASETS))}) or an uploaded dataset id "
        f"('ds_' + 12 hex). Received: dataset={dataset_id!r}"
    )


def load_dataset(
    dataset_id: str,
    *,
    store: DatasetSource | None = None,
    seed: int = 0,
    max_train_images: int | None = None,
) -> DatasetSplits:
    """Load a built-in or uploaded dataset as float32 NHWC train/test splits in [0, 1].

    `seed` picks the train/test split of uploaded datasets and the `max_train_images` subset; built-ins keep
    their fixed test split. Raises DatasetNotFound or DatasetUnavailable (online dataset, offline, no cache).
    """
    if max_train_images is not None and max_train_images < 1:
        raise ValueError(f"Expected max_train_images >= 1 or None. Received: max_train_images={max_train_images}")
    builtin = BUILTIN_DATASETS.get(dataset_id)
    if builtin is not None:
        train, test, fingerprint = builtin.load(store)
        _KNOWN_FINGERPRINTS[dataset_id] = fingerprint
        # Subset first: only the kept images are converted (the memoized pixels stay untouched).
        train = subset_train(train, max_train_images, seed)
        return DatasetSplits(
            dataset_id, to_unit_float(train, builtin.pixel_max), to_unit_float(test, builtin.pixel_max), fingerprint
        )

    if not is_dataset_id(dataset_id):
        raise _unknown_dataset(dataset_id)
    if store is None:
        raise DatasetNotFound(
            f"Uploaded datasets live in the model store. Expected a store to load from. Received: store=None, "
            f"dataset={dataset_id!r}"
        )
    info = store.info(dataset_id)
    images = store.load_images(dataset_id)
    train_images, test_images = split_train_test(images, seed)
    train_images = subset_train(train_images, max_train_images, seed)
    return DatasetSplits(dataset_id, train_images, test_images, info.fingerprint or fingerprint_pixels(images))


def dataset_info(dataset_id: str, store: DatasetSource | None = None) -> DatasetInfo:
    """What a dataset is (shape, counts, availability) without loading its pixels. DatasetNotFound otherwise."""
    builtin = BUILTIN_DATASETS.get(dataset_id)
    if builtin is not None:
        return DatasetInfo(
            id=dataset_id,
            builtin=True,
            description=builtin.description,
            count=builtin.train_count + builtin.test_count,
            shape=list(builtin.image_shape),
            available=builtin.available is None or builtin.available(store),
            fingerprint=_KNOWN_FINGERPRINTS.get(dataset_id),
        )
    if not is_dataset_id(dataset_id) or store is None:
        raise _unknown_dataset(dataset_id)
    return store.info(dataset_id)


def list_datasets(store: DatasetSource | None = None) -> list[DatasetInfo]:
    """Built-in datasets (in a fixed order) followed by uploaded ones (newest first)."""
    infos = [dataset_info(name, store) for name in BUILTIN_DATASETS]
    if store is not None:
        infos.extend(store.list())
    return infos
