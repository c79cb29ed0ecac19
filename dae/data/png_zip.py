"""Uploaded zips of PNG images: entry count, declared sizes and every IHDR checked before one pixel is inflated."""

from __future__ import annotations

import io
import zipfile
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import NDArray

from dae.data.upload_limits import (
    FLOAT32_BYTES,
    ZIP_ENTRY_ALLOWANCE,
    UploadLimits,
    check_image_dims,
    check_zip_entries,
    member_errors,
    open_zip,
)
from dae.errors import InvalidDataset, PayloadTooLarge

if TYPE_CHECKING:
    from PIL import Image

#: What a PNG may hold besides its pixels (ICC profile, text chunks): per file, and on average in a zip.
_PNG_FILE_EXTRA_BYTES = 1024 * 1024
_PNG_AVERAGE_EXTRA_BYTES = 64 * 1024
#: The largest raw PNG pixel (16-bit RGBA) against the smallest decoded one (float32 gray).
_PNG_RAW_BYTES_PER_PIXEL = 8

_IGNORED_ZIP_ENTRIES = ("__MACOSX/", ".DS_Store", "Thumbs.db")
_GRAY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"}


def _ignored(name: str) -> bool:
    base = name.rsplit("/", 1)[-1]
    return name.startswith("__MACOSX/") or base.startswith("._") or base in _IGNORED_ZIP_ENTRIES


def parse_png_zip(content: bytes, filename: str, limits: UploadLimits) -> NDArray[np.float32]:
    """The images of a zip of PNGs: entry count, declared sizes, every IHDR, then one allocation and the decoding."""
    check_zip_entries(
        content,
        filename,
        limits.max_images + ZIP_ENTRY_ALLOWANCE,
        f"at most {limits.max_images:,} PNGs (DAE_MAX_DATASET_IMAGES) plus {ZIP_ENTRY_ALLOWANCE:,} other entries",
    )
    archive = open_zip(content, filename)
    entries = _png_entries(archive, filename, limits.max_images)
    _check_declared_png_sizes(entries, limits, filename)
    headers = [_png_header(archive, info) for info in entries]
    height, width, channels = _common_png_shape(entries, headers)
    check_image_dims(len(entries), height, width, channels, limits, filename)
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
    total_limit = limits.max_bytes * _PNG_RAW_BYTES_PER_PIXEL // FLOAT32_BYTES + len(entries) * _PNG_AVERAGE_EXTRA_BYTES
    if total_declared > total_limit:
        raise PayloadTooLarge(
            f"The zip would expand to {total_declared:,} bytes. Expected at most {total_limit:,} bytes of PNGs "
            f"(DAE_MAX_DATASET_MB). Received: filename={filename!r}"
        )


def _png_header(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> tuple[int, int, int]:
    """(height, width, channels) from a PNG's IHDR: Image.open is lazy and inflates only the chunks before the pixels."""
    from PIL import Image  # noqa: PLC0415 - only uploads need PIL

    with (
        member_errors("a decodable PNG", repr(info.filename)),
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


def _decode_png_into(
    target: NDArray[np.float32], archive: zipfile.ZipFile, info: zipfile.ZipInfo, file_limit: int
) -> None:
    """Decode one PNG member into its (H, W, C) slot of the result (a gray image broadcasts to RGB)."""
    from PIL import Image  # noqa: PLC0415 - only uploads need PIL

    with member_errors("a decodable PNG", repr(info.filename)):
        with archive.open(info) as handle:
            data = handle.read(file_limit + 1)
        with Image.open(io.BytesIO(data)) as image:
            target[...] = png_pixels(image)


def png_pixels(image: Image.Image) -> NDArray[np.float32]:
    """One PIL image -> float32 (H, W, 1) for grayscale or (H, W, 3) for colour, in [0, 1]; alpha dropped."""
    mode = image.mode
    if mode in ("I", "I;16", "I;16B", "I;16L"):
        # 16-bit grayscale PNGs decode to the I modes.
        return (np.asarray(image, dtype=np.float32) / np.float32(65535.0)).clip(0, 1)[..., np.newaxis]
    if mode in _GRAY_MODES:
        return (np.asarray(image.convert("L"), dtype=np.float32) / np.float32(255.0))[..., np.newaxis]
    return np.asarray(image.convert("RGB"), dtype=np.float32) / np.float32(255.0)
