"""IDX files (the format of the MNIST family) and Fashion-MNIST read from them.

The Debian package dataset-fashion-mnist installs the canonical IDX files (gzip-compressed) at FASHION_MNIST_DIR;
without them Fashion-MNIST falls back to the store's cache, then to a download (dae.data.online).
"""

from __future__ import annotations

import functools
import gzip
import logging
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from dae.data.online import PixelSplits, load_online_pixels, online_available
from dae.data.source import DatasetSource
from dae.fingerprints import fingerprint_pixels

logger = logging.getLogger(__name__)

#: Where the Debian package dataset-fashion-mnist installs the canonical IDX files. Tests point it elsewhere.
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")

_FASHION_FILES = ("train-images-idx3-ubyte.gz", "t10k-images-idx3-ubyte.gz")
_IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}

#: (size, mtime) of each IDX file: the memo's key, so replaced files are read again.
FileStamp = tuple[tuple[int, int], ...]


def parse_idx(raw: bytes) -> NDArray[Any]:
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


def read_idx(path: Path) -> NDArray[Any]:
    """Read an IDX file, gzip-compressed when its name ends in .gz."""
    path = Path(path)
    if path.suffix == ".gz":
        with gzip.open(path, "rb") as compressed:
            return parse_idx(compressed.read())
    return parse_idx(path.read_bytes())


@functools.lru_cache(maxsize=2)
def _read_fashion_mnist_dir(directory: str, stamp: FileStamp) -> PixelSplits:
    """(train uint8, test uint8, fingerprint) from the IDX files in `directory`; memoized per file stamp."""
    del stamp  # only the memo's key: new files, new stamp, new read
    train = read_idx(Path(directory) / _FASHION_FILES[0])
    test = read_idx(Path(directory) / _FASHION_FILES[1])
    for part, pixels in (("train", train), ("t10k", test)):
        if pixels.dtype != np.uint8 or pixels.ndim != 3:
            raise ValueError(f"Expected {part} images as uint8 (N, H, W). Received: {pixels.dtype} {pixels.shape}")
    train.flags.writeable = False
    test.flags.writeable = False
    return train, test, fingerprint_pixels(train, test)


def _idx_stamp(directory: Path) -> FileStamp | None:
    stamps = []
    for name in _FASHION_FILES:
        try:
            status = os.stat(directory / name)
        except OSError:
            return None
        stamps.append((status.st_size, status.st_mtime_ns))
    return tuple(stamps)


def load_fashion_mnist_pixels(directory: Path | None = None, store: DatasetSource | None = None) -> PixelSplits:
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
    return load_online_pixels("fashion_mnist", store)


def fashion_mnist_available(store: DatasetSource | None) -> bool:
    """Whether Fashion-MNIST loads without a download: its IDX files, or a cached copy."""
    return _idx_stamp(FASHION_MNIST_DIR) is not None or online_available("fashion_mnist", store)
