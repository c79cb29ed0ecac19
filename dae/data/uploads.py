"""Uploaded datasets: a .npz of one pixel array, or a .zip of PNGs (dae.data.png_zip), validated and decoded.

Hostile input is refused from headers before it costs memory: the zip's entry count from its end-of-central-directory
record, then the .npy header's shape and dtype (pickled object arrays are refused; allow_pickle is never on), then the
decoded float32 size against `max_bytes`; only then is the data read, in chunks, straight into the one result array.
"""

from __future__ import annotations

import math
import zipfile
from typing import IO, Any

import numpy as np
from numpy.typing import NDArray

from dae.data.png_zip import parse_png_zip
from dae.data.splits import MIN_UPLOAD_IMAGES
from dae.data.upload_limits import (
    DEFAULT_MAX_DATASET_BYTES,
    NPZ_MAX_MEMBERS,
    UploadLimits,
    check_image_dims,
    check_zip_entries,
    member_errors,
    open_zip,
)
from dae.errors import InvalidDataset

#: Bytes of a .npy member read at a time: the only allocation besides the float32 result.
_NPY_READ_CHUNK_BYTES = 4 * 1024 * 1024


def parse_uploaded_dataset(
    filename: str,
    content: bytes,
    *,
    max_images: int = 100_000,
    max_side: int = 512,
    max_bytes: int = DEFAULT_MAX_DATASET_BYTES,
) -> NDArray[np.float32]:
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
        images = parse_png_zip(content, filename, limits)
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


def _parse_npz(content: bytes, filename: str, limits: UploadLimits) -> NDArray[np.float32]:
    """The images of a .npz: entry count, then the .npy header, then (only if both pass) the data."""
    check_zip_entries(content, filename, NPZ_MAX_MEMBERS, f"a .npz of at most {NPZ_MAX_MEMBERS} arrays")
    archive = open_zip(content, filename)
    key, info = _npz_images_member(archive)
    with member_errors("a readable .npy array", f"key {key!r}"), archive.open(info) as handle:
        # The .npy header first: shape and dtype decide whether reading the data is allowed at all.
        shape, fortran_order, dtype = _npy_header(handle, key)
        channels = _npz_channels(shape, dtype, key)
        check_image_dims(shape[0], shape[1], shape[2], channels, limits, filename)
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


def _npy_header(handle: IO[bytes], key: str) -> tuple[tuple[int, ...], bool, np.dtype[Any]]:
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


def _npz_channels(shape: tuple[int, ...], dtype: np.dtype[Any], key: str) -> int:
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
    handle: IO[bytes], shape: tuple[int, ...], fortran_order: bool, dtype: np.dtype[Any], key: str
) -> NDArray[np.float32]:
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


def _check_unit_range(images: NDArray[np.float32]) -> None:
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
