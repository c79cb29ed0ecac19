"""Built-ins that keras.datasets downloads (mnist; fashion_mnist without its IDX files), cached in a DatasetSource.

keras is imported only to download: a cached copy (the source's cache_dir/<name>.npz) is read with numpy alone.
"""

from __future__ import annotations

import io
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from dae.data.source import DatasetSource
from dae.errors import DatasetUnavailable
from dae.fingerprints import fingerprint_pixels

logger = logging.getLogger(__name__)

#: (train uint8 (N, H, W), test uint8 (M, H, W), fingerprint): what every built-in loader returns.
PixelSplits = tuple[NDArray[Any], NDArray[Any], str]

#: The file that shows keras already downloaded a dataset into its own cache (~/.keras/datasets).
_KERAS_CACHE_FILES = {
    "mnist": Path("mnist.npz"),
    "fashion_mnist": Path("fashion-mnist") / "t10k-images-idx3-ubyte.gz",
}


def _cache_path(name: str, store: DatasetSource | None) -> Path | None:
    return store.cache_dir / f"{name}.npz" if store is not None else None


def keras_cache_has(name: str) -> bool:
    """Whether keras has this dataset in its own download cache (~/.keras/datasets), without importing keras."""
    keras_home = Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")) / "datasets"
    return (keras_home / _KERAS_CACHE_FILES[name]).is_file()


def load_online_pixels(name: str, store: DatasetSource | None) -> PixelSplits:
    """The store's cached copy of `name`, else a download through keras.datasets (then cached in the store)."""
    cache_path = _cache_path(name, store)
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
    if store is not None and cache_path is not None:
        buffer = io.BytesIO()
        np.savez(buffer, x_train=train, x_test=test)
        store.write_cache(cache_path.name, buffer.getvalue())
        logger.info("cached %s in %s", name, cache_path)
    return train, test, fingerprint_pixels(train, test)


def online_available(name: str, store: DatasetSource | None) -> bool:
    """Whether `name` loads without a download: cached in the store or in keras's own cache."""
    cache_path = _cache_path(name, store)
    return (cache_path is not None and cache_path.is_file()) or keras_cache_has(name)
