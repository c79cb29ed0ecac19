"""The caps an upload is checked against, and the checks that run before anything of it is decompressed.

Hostile-input guarantees shared by the .npz and the zip-of-PNGs parsers: the entry count of a zip comes from its
end-of-central-directory record before zipfile lists a single member (check_zip_entries); the decoded size (float32
pixels) is checked from header figures alone before any pixel is allocated (check_image_dims); whatever a corrupt
member raises becomes InvalidDataset or PayloadTooLarge (member_errors).
"""

from __future__ import annotations

import contextlib
import io
import struct
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass

from dae.errors import InvalidDataset, PayloadTooLarge

#: Default of DAE_MAX_DATASET_MB: an upload decodes to at most 256 MiB of float32 pixels, the array the parser returns
#: and training loads (Fashion-MNIST's 70,000 28x28 images take 209 MiB).
DEFAULT_MAX_DATASET_BYTES = 256 * 1024 * 1024
#: Zip entries allowed beyond the image limit: folders and the __MACOSX/, .DS_Store files that are skipped.
ZIP_ENTRY_ALLOWANCE = 1024
#: Most members of an uploaded .npz (one per array; a dataset holds a handful).
NPZ_MAX_MEMBERS = 64
MIN_IMAGE_SIDE = 3  # SSIM in the evaluation needs a 3x3 window

#: Every upload decodes to float32.
FLOAT32_BYTES = 4
#: The zip records read before zipfile is let loose on an upload (APPNOTE.TXT 4.3.14-4.3.16).
_EOCD = struct.Struct("<4s4H2LH")
_ZIP64_LOCATOR = struct.Struct("<4sLQL")
_ZIP64_EOCD = struct.Struct("<4sQ2H2L4Q")
_ZIP_COMMENT_WINDOW = 1 << 16  # a zip comment is at most 65,535 bytes


@dataclass(frozen=True)
class UploadLimits:
    """The caps an upload is checked against, from its headers, before anything is decoded."""

    max_images: int = 100_000
    max_side: int = 512
    max_bytes: int = DEFAULT_MAX_DATASET_BYTES


def decoded_bytes(count: int, height: int, width: int, channels: int) -> int:
    """Bytes of `count` images decoded to float32 (N, H, W, C): the parser's result and what training loads."""
    return count * height * width * channels * FLOAT32_BYTES


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
        return  # not a zip: open_zip says so
    declared, start, end = directory
    # zipfile reads records until the directory's byte size is used up, whatever the count field says: count those.
    entries = max(declared, content.count(b"PK\x01\x02", start, end))
    if entries > max_entries:
        raise PayloadTooLarge(
            f"Too many entries in {filename!r}. Expected {expected}. "
            f"Received: {entries:,} entries (from its end-of-central-directory record)"
        )


def open_zip(content: bytes, filename: str) -> zipfile.ZipFile:
    """The upload as a ZipFile (after check_zip_entries: listing its members is then bounded)."""
    try:
        return zipfile.ZipFile(io.BytesIO(content))
    except (zipfile.BadZipFile, ValueError) as error:
        kind = "npz (a zip of .npy arrays)" if filename.lower().endswith(".npz") else "zip archive"
        raise InvalidDataset(f"Expected a valid {kind}. Received: {filename!r} ({error})") from None


def check_image_dims(count: int, height: int, width: int, channels: int, limits: UploadLimits, filename: str) -> None:
    """Refuse from the headers' figures alone, before any pixel is decoded or allocated."""
    if count > limits.max_images:
        raise PayloadTooLarge(
            f"Too many images in {filename!r}. Expected at most {limits.max_images}. Received: {count}"
        )
    if min(height, width) < MIN_IMAGE_SIDE:
        raise InvalidDataset(
            f"Images are too small. Expected height and width >= {MIN_IMAGE_SIDE}. Received: {height}x{width}"
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
def member_errors(expected: str, name: str) -> Iterator[None]:
    """Turn what a corrupt zip member raises (zipfile, zlib, numpy and PIL use many types) into InvalidDataset."""
    from PIL import Image, UnidentifiedImageError  # noqa: PLC0415 - only uploads need PIL

    try:
        yield
    except (InvalidDataset, PayloadTooLarge, MemoryError):
        raise
    except Image.DecompressionBombError as error:
        # Pillow raises this only while its guard is on, i.e. MAX_IMAGE_PIXELS is set.
        guard = (Image.MAX_IMAGE_PIXELS or 0) * 2
        raise PayloadTooLarge(
            f"{name} is larger than Pillow's decompression-bomb guard allows. Expected {expected} of at most "
            f"{guard:,} pixels. Received: {error}"
        ) from None
    except UnidentifiedImageError:
        raise InvalidDataset(f"Expected {expected}. Received: {name}, which is not an image file") from None
    except Exception as error:
        raise InvalidDataset(f"Expected {expected}. Received: {name} ({type(error).__name__}: {error})") from None
