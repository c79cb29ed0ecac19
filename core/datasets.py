"""Uploaded datasets in the store: datasets/<id>.npz (compressed pixels) + datasets/<id>.json (its DatasetInfo),
and cache/ for built-in datasets fetched once (e.g. cache/mnist.npz).

The .json is written last and removed first: its presence is what makes a dataset exist. Pixels that are exactly
k/255 are stored as uint8 (4x smaller, lossless). Files are read with `allow_pickle=False`, always.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

import numpy as np

from core.fsio import atomic_write, atomic_write_bytes, atomic_write_text
from dae.errors import DatasetNotFound, PayloadTooLarge
from dae.fingerprints import fingerprint_pixels
from dae.spec import DEFAULT_OWNER, DatasetInfo, check_owner, is_dataset_id

logger = logging.getLogger(__name__)



def new_dataset_id() -> str:
    """A fresh random dataset id: "ds_" + 12 hex characters."""
    return "ds_" + secrets.token_hex(6)





class DatasetStore:
    """Uploaded datasets (and the cache of fetched built-ins) under a store root, as one owner sees them: another
    owner's dataset is DatasetNotFound; `every_owner=True` (an admin) sees all. Files written before owners existed
    belong to the default owner."""

    def __init__(self, root: Path | str, owner: str = DEFAULT_OWNER, *, every_owner: bool = False) -> None:
        self.root = Path(root).resolve()
        self.owner = check_owner(owner)
        self.every_owner = every_owner
        self.directory = self.root / "datasets"
        self.cache_dir = self.root / "cache"

    def __repr__(self) -> str:
        return f"DatasetStore(root={str(self.root)!r}, owner={self.owner!r}, every_owner={self.every_owner})"

    def with_owner(self, owner: str, *, every_owner: bool = False) -> DatasetStore:
        """The same store as `owner` sees it."""
        return DatasetStore(self.root, owner, every_owner=every_owner)

    def write_cache(self, filename: str, data: bytes) -> None:
        """Keep a fetched built-in dataset (e.g. "mnist.npz") in cache/, atomically."""
        if "/" in filename or filename.startswith("."):
            raise ValueError(f"Expected a plain file name. Received: filename={filename!r}")
        atomic_write_bytes(self.cache_dir / filename, data)

    def _check_dataset_id(self, dataset_id: str) -> str:
        if not isinstance(dataset_id, str) or not is_dataset_id(dataset_id):
            raise DatasetNotFound(
                f"No uploaded dataset with this id. Expected 'ds_' + 12 hex characters. Received: dataset_id={dataset_id!r}"
            )
        return dataset_id

    def total_bytes(self) -> int:
        """Bytes the uploaded datasets take on disk (their .npz and .json files): what a store cap counts."""
        try:
            entries = list(os.scandir(self.directory))
        except FileNotFoundError:
            return 0
        total = 0
        for entry in entries:
            stem, _, extension = entry.name.partition(".")
            if extension in ("npz", "json") and is_dataset_id(stem):
                with contextlib.suppress(FileNotFoundError):  # deleted while counting
                    total += entry.stat(follow_symlinks=False).st_size
        return total

    def save(
        self,
        images: np.ndarray,
        *,
        filename: str | None = None,
        description: str = "",
        max_total_bytes: int | None = None,
    ) -> DatasetInfo:
        """Store validated images (float32 NHWC in [0, 1]) as datasets/<id>.npz (compressed) plus its <id>.json.

        Images that are exactly k/255 are stored as uint8 (4x smaller, lossless); others as float32. With
        `max_total_bytes`, an upload that would take the datasets past it is refused (PayloadTooLarge) and leaves
        nothing behind.
        """
        if not isinstance(images, np.ndarray) or images.ndim != 4 or images.shape[0] < 1:
            raise ValueError(
                f"Expected a non-empty (N, H, W, C) array. Received: shape={getattr(images, 'shape', None)}"
            )
        used = 0
        if max_total_bytes is not None:
            used = self.total_bytes()
            _check_datasets_room(used, 1, max_total_bytes, "an upload while the store is full")  # before compressing
        stored = _stored_pixels(np.ascontiguousarray(images, dtype=np.float32))
        dataset_id = new_dataset_id()
        info = DatasetInfo(
            id=dataset_id,
            builtin=False,
            description=description or (f"Uploaded from {filename}" if filename else "Uploaded dataset"),
            count=int(stored.shape[0]),
            shape=[int(side) for side in stored.shape[1:]],
            available=True,
            owner=self.owner,
            created_at=datetime.now(UTC),
            filename=filename,
            fingerprint=fingerprint_pixels(stored),
        )
        metadata = info.model_dump_json(indent=2)

        def write_pixels(handle: BinaryIO) -> None:
            np.savez_compressed(handle, x=stored)
            if max_total_bytes is not None:
                # The compressed size is known only now; the temp file goes if it does not fit.
                needed = handle.tell() + len(metadata.encode())
                _check_datasets_room(used, needed, max_total_bytes, f"{needed:,} bytes (compressed pixels and metadata)")

        atomic_write(self.directory / f"{dataset_id}.npz", write_pixels)
        # The metadata file is written last: its presence is what makes the dataset exist.
        atomic_write_text(self.directory / f"{dataset_id}.json", metadata)
        logger.info("saved dataset %s (%d images of %s)", dataset_id, info.count, info.shape)
        return info

    def info(self, dataset_id: str) -> DatasetInfo:
        """Metadata of an uploaded dataset (cheap: reads only its .json). DatasetNotFound otherwise."""
        self._check_dataset_id(dataset_id)
        try:
            text = (self.directory / f"{dataset_id}.json").read_text(encoding="utf-8")
        except FileNotFoundError:
            raise DatasetNotFound(f"No uploaded dataset with this id. Received: dataset_id={dataset_id!r}") from None
        info = DatasetInfo.model_validate_json(text)
        if info.owner is None:  # written before owners existed
            info = info.model_copy(update={"owner": DEFAULT_OWNER})
        if not self.every_owner and info.owner != self.owner:
            raise DatasetNotFound(f"No uploaded dataset with this id. Received: dataset_id={dataset_id!r}")
        return info

    def load_images(self, dataset_id: str) -> np.ndarray:
        """All images of an uploaded dataset as float32 (N, H, W, C) in [0, 1]; compressed and (older) uncompressed
        files alike, never unpickling anything."""
        self.info(dataset_id)
        try:
            with np.load(self.directory / f"{dataset_id}.npz", allow_pickle=False) as archive:
                stored = archive["x"]
        except FileNotFoundError:
            raise DatasetNotFound(
                f"Dataset {dataset_id} has no pixel file. Received: dataset_id={dataset_id!r}"
            ) from None
        pixels: np.ndarray = stored
        if pixels.dtype == np.uint8:
            scaled: np.ndarray = np.divide(pixels, np.float32(255.0), dtype=np.float32)  # one allocation, no temporary
            return scaled
        return pixels.astype(np.float32, copy=False)

    def list(self) -> list[DatasetInfo]:
        """Uploaded datasets, newest first."""
        try:
            entries = os.listdir(self.directory)
        except FileNotFoundError:
            return []
        infos = []
        for entry in entries:
            stem, _, extension = entry.partition(".")
            if extension != "json" or not is_dataset_id(stem):
                continue
            try:
                infos.append(self.info(stem))
            except DatasetNotFound:
                continue
        infos.sort(key=lambda info: (info.created_at or datetime.min.replace(tzinfo=UTC), info.id), reverse=True)
        return infos

    def delete(self, dataset_id: str) -> None:
        """Delete an uploaded dataset. DatasetNotFound if there is none with this id."""
        self.info(dataset_id)
        # Metadata first: the dataset stops existing at once, the pixels follow.
        with contextlib.suppress(FileNotFoundError):
            (self.directory / f"{dataset_id}.json").unlink()
        with contextlib.suppress(FileNotFoundError):
            (self.directory / f"{dataset_id}.npz").unlink()
        logger.info("deleted dataset %s", dataset_id)


#: Values per step when checking whether float pixels are exactly k/255 (bounds the temporaries to a few MiB).
_UINT8_CHECK_CHUNK = 1 << 20


def _stored_pixels(images: np.ndarray) -> np.ndarray:
    """uint8 when every float32 value is exactly k/255 (4x smaller, lossless), else the images themselves."""
    as_uint8 = np.empty(images.shape, np.uint8)
    flat_images, flat_uint8 = images.reshape(-1), as_uint8.reshape(-1)
    for start in range(0, flat_images.size, _UINT8_CHECK_CHUNK):
        chunk = flat_images[start : start + _UINT8_CHECK_CHUNK]
        levels = np.rint(chunk * np.float32(255.0)).clip(0, 255)
        if not np.array_equal(levels / np.float32(255.0), chunk):
            return images
        flat_uint8[start : start + _UINT8_CHECK_CHUNK] = levels
    return as_uint8


def _check_datasets_room(used: int, needed: int, max_total_bytes: int, received: str) -> None:
    """PayloadTooLarge when `needed` more bytes would take the stored datasets past `max_total_bytes`."""
    if used + needed <= max_total_bytes:
        return
    raise PayloadTooLarge(
        f"The dataset store has no room for this upload: uploaded datasets take {used:,} of the {max_total_bytes:,} "
        f"bytes allowed ({used / 2**30:.2f} of {max_total_bytes / 2**30:.2f} GiB, DAE_MAX_STORE_DATASETS_GB). "
        f"Expected an upload that stores in at most {max(0, max_total_bytes - used):,} bytes; delete datasets to "
        f"make room. Received: {received}"
    )
