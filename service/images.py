"""Images in and out of the gateway: base64 PNG/JPEG, pixel arrays, raw float32 buffers, PNG and heatmaps.

Every decoder returns float32 H×W×C in [0, 1] (C = 1 or 3) and raises InvalidImage (422) or PayloadTooLarge (413)
with a message saying what was expected and what was received.

Colour conventions (explicit, so a client knows what the model saw):
- alpha is dropped (not composited): RGBA → RGB, LA → L;
- a 3-channel image sent to a 1-channel model is converted to luminance with the ITU-R BT.601 weights
  Y = 0.299 R + 0.587 G + 0.114 B (the weights PIL's "L" conversion uses);
- a 1-channel image sent to a 3-channel model is replicated into R, G and B;
- 8-bit images are divided by 255, 16-bit ones by 65535.
"""

from __future__ import annotations

import binascii
import functools
import io
import math
import struct
import warnings
import zlib
from collections.abc import Callable
from typing import Any

import numpy as np
import pybase64
from PIL import Image, PngImagePlugin, UnidentifiedImageError

from dae.errors import InvalidImage, PayloadTooLarge
from service.png_reader import PNG_SIGNATURE as _PNG_SIGNATURE
from service.png_reader import read_png_header, read_simple_png

#: ITU-R BT.601 luma weights, used to turn RGB into the single channel of a grayscale model.
LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114], dtype=np.float32)

#: PNG zlib level for responses: 1 is several times faster than the default 6 and only slightly larger.
PNG_COMPRESS_LEVEL = 1
#: Pixel data up to this many bytes is stored in the PNG without compression (_stored_idat): measured on 28x28
#: denoised images and heatmaps, level 1 saved 1-11% of the bytes and cost ~35 µs per image, ten times the
#: stored write (deflate's set-up dominates on small inputs; such pixels are too noisy to shrink much anyway).
PNG_STORE_BELOW_BYTES = 4096

_ACCEPTED_FORMATS = ("PNG", "JPEG")
#: Pillow modes that decode to one channel (service.images drops alpha; 16- and 32-bit gray stay gray).
_GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "F"})
_DATA_URL_SEPARATOR = ";base64,"
_PNG_END = b"IEND"

# The "inferno" colormap sampled at 17 points (from matplotlib, which is not imported here); interpolated to a
# 256-entry lookup table once at import. Perceptually uniform and readable in grayscale print.
_INFERNO_POINTS = np.array(
    [
        [0, 0, 4], [11, 7, 36], [33, 12, 74], [61, 9, 101], [87, 16, 110], [113, 25, 110], [138, 34, 106],
        [163, 44, 97], [188, 55, 84], [210, 70, 68], [228, 90, 49], [241, 115, 29], [249, 142, 9],
        [252, 172, 17], [249, 203, 53], [242, 234, 105], [252, 255, 164],
    ],
    dtype=np.float64,
)


def _build_lut(points: np.ndarray) -> np.ndarray:
    """A 256×3 uint8 colour lookup table linearly interpolated between evenly spaced control points."""
    positions = np.linspace(0.0, 1.0, len(points))
    levels = np.linspace(0.0, 1.0, 256)
    channels = [np.interp(levels, positions, points[:, channel]) for channel in range(3)]
    return np.rint(np.stack(channels, axis=1)).astype(np.uint8)


HEATMAP_LUT = _build_lut(_INFERNO_POINTS)


# ---------------------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------------------


def decode_base64(data: str, *, field: str) -> bytes:
    """Bytes of a base64 string (standard alphabet; a `data:...;base64,` prefix and whitespace are allowed)."""
    if _DATA_URL_SEPARATOR in data[:100]:
        data = data.split(_DATA_URL_SEPARATOR, 1)[1]
    # pybase64: the standard library's codec with SIMD loops (same alphabet, padding and errors; ~6x faster on
    # the kilobytes of a small image, which /reconstruct decodes and encodes several times per request).
    try:
        return pybase64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        pass
    try:  # the slow path: line-wrapped base64 (e.g. from `base64` without -w0)
        return pybase64.b64decode("".join(data.split()), validate=True)
    except (binascii.Error, ValueError):
        raise InvalidImage(
            f"{field} is not valid base64. Expected standard base64 (optionally a data: URL). "
            f"Received: {len(data)} characters starting with {data[:16]!r}"
        ) from None


class PendingImage:
    """A source whose header has been read and checked, its pixels not decoded yet: `count` images (more than one
    only for a 4-D array) of height × width × channels values once decoded (channels as decoded: alpha is dropped,
    a palette becomes RGB). What a request will cost is known from these before anything large is allocated."""

    __slots__ = ("count", "height", "width", "channels", "values", "field", "decoder")

    def __init__(self, count: int, height: int, width: int, channels: int, field: str,
                 decoder: Callable[[], np.ndarray]) -> None:
        self.count, self.height, self.width, self.channels = count, height, width, channels
        self.values = count * height * width * channels  # float32 values the decoded pixels take
        self.field = field
        self.decoder = decoder

    def decode(self) -> np.ndarray:
        """float32 (H, W, C), or (N, H, W, C) for a 4-D array, in [0, 1]; InvalidImage when the pixels do not
        have the size the header promised."""
        pixels = self.decoder()
        if pixels.shape[-3:-1] != (self.height, self.width):
            raise InvalidImage(
                f"{self.field} does not match its own header. Expected {self.height}×{self.width} pixels. "
                f"Received: {pixels.shape[-3]}×{pixels.shape[-2]}"
            )
        return pixels


def open_image_bytes(content: bytes, *, max_side: int, field: str = "image") -> PendingImage:
    """PNG or JPEG bytes with their header read (PNG: IHDR; otherwise Pillow's lazy open, which reads only the
    header, e.g. a JPEG's SOF) and the side limit checked; PayloadTooLarge or InvalidImage before any pixel."""
    if not content:
        raise InvalidImage(f"{field} is empty. Expected the bytes of a PNG or JPEG image. Received: 0 bytes")
    header = read_png_header(content)
    if header is not None:  # the common case: 33 bytes read, no Pillow object
        height, width, channels = header
        _check_side(height, width, max_side=max_side, field=field)
        return PendingImage(1, height, width, channels, field,
                            functools.partial(_decode_png, content, max_side=max_side, field=field))
    image = _open_with_pillow(content, max_side=max_side, field=field)
    width, height = image.size
    _check_side(height, width, max_side=max_side, field=field)
    channels = 1 if image.mode in _GRAY_MODES else 3
    return PendingImage(1, height, width, channels, field, functools.partial(_load_pillow, image, content, field=field))


def decode_image_bytes(content: bytes, *, max_side: int, field: str = "image") -> np.ndarray:
    """Decode PNG or JPEG bytes to float32 H×W×C in [0, 1] (C = 1 or 3; alpha dropped)."""
    return open_image_bytes(content, max_side=max_side, field=field).decode()


def _decode_png(content: bytes, *, max_side: int, field: str) -> np.ndarray:
    """A PNG whose IHDR was read: the fast reader for the common PNGs, else Pillow's full reader."""
    pixels = read_simple_png(content, max_side=max_side)
    if pixels is not None:  # the common PNGs, read without Pillow's Python-level file handling
        return _uint8_to_float(pixels)
    image = _open_with_pillow(content, max_side=max_side, field=field)
    _check_side(image.size[1], image.size[0], max_side=max_side, field=field)
    return _load_pillow(image, content, field=field)


def _open_with_pillow(content: bytes, *, max_side: int, field: str) -> Image.Image:
    """Pillow's lazy open (header only) of PNG or JPEG bytes; InvalidImage for anything else."""
    try:
        if content.startswith(_PNG_SIGNATURE):
            # The PNG reader directly: Image.open's format probing and bomb warning cost ~20 µs on a 28x28 image;
            # the side limit (checked before any pixel is decoded) is the real guard against bombs.
            image = PngImagePlugin.PngImageFile(io.BytesIO(content))
        else:
            with warnings.catch_warnings():
                # Pillow warns (DecompressionBombWarning) before it errors; the side limit is the real check.
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                image = Image.open(io.BytesIO(content))
    except Image.DecompressionBombError:
        raise PayloadTooLarge(
            f"{field} has too many pixels. Expected sides of at most {max_side} pixels. Received: a decompression bomb"
        ) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise InvalidImage(
            f"{field} is not a readable image. Expected PNG or JPEG bytes. Received: {len(content)} bytes "
            f"starting with {content[:8]!r}"
        ) from None
    if image.format not in _ACCEPTED_FORMATS:
        raise InvalidImage(f"{field} has an unsupported format. Expected PNG or JPEG. Received: {image.format}")
    return image


def _load_pillow(image: Image.Image, content: bytes, *, field: str) -> np.ndarray:
    """The pixels of an image opened by _open_with_pillow (sides already checked)."""
    if image.format == "PNG" and content.rfind(_PNG_END) == -1:
        # Pillow decodes a PNG cut after its pixel data without complaint; a file without IEND is truncated.
        raise InvalidImage(
            f"{field} could not be decoded (truncated PNG: no IEND chunk). Expected a complete image file. "
            f"Received: {len(content)} bytes"
        )
    try:
        image.load()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise InvalidImage(
            f"{field} could not be decoded (truncated or corrupt {image.format}). Expected a complete image file. "
            f"Received: {len(content)} bytes ({error})"
        ) from None
    return _pil_to_float(image, field=field)


def _pil_to_float(image: Image.Image, *, field: str) -> np.ndarray:
    """float32 H×W×C in [0, 1] from a loaded PIL image, in one conversion pass for the common modes."""
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I"):
        pixels = np.asarray(image)
        if mode == "I" and (pixels.min() < 0 or pixels.max() > 65535):
            raise InvalidImage(f"{field} has 32-bit pixels. Expected 8- or 16-bit images. Received: mode {mode}")
        return np.divide(pixels, np.float32(65535), dtype=np.float32)[:, :, None]
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    elif mode in ("1", "LA", "La"):
        image = image.convert("L")
    elif mode not in ("L", "RGB", "RGBA"):
        image = image.convert("RGB")  # CMYK, YCbCr, ... (JPEG)
    width, height = image.size
    # tobytes + frombuffer: the same bytes as np.asarray(image) without building its __array_interface__ dict.
    return _uint8_to_float(np.frombuffer(image.tobytes(), np.uint8).reshape(height, width, len(image.mode)))


def _uint8_to_float(pixels: np.ndarray) -> np.ndarray:
    """float32 H×W×C in [0, 1] from uint8 H×W×C with C in 1-4: alpha dropped (documented above)."""
    channels = pixels.shape[2]
    if channels == 2:
        pixels = pixels[:, :, :1]
    elif channels == 4:
        pixels = pixels[:, :, :3]
    return np.divide(pixels, np.float32(255), dtype=np.float32)


def open_base64_image(data: str, *, max_side: int, field: str = "image") -> PendingImage:
    """A base64 PNG/JPEG with its header read (see open_image_bytes)."""
    return open_image_bytes(decode_base64(data, field=field), max_side=max_side, field=field)


def decode_base64_image(data: str, *, max_side: int, field: str = "image") -> np.ndarray:
    """Decode a base64 PNG/JPEG to float32 H×W×C in [0, 1]."""
    return open_base64_image(data, max_side=max_side, field=field).decode()


def open_pixels(pixels: Any, *, max_side: int, field: str = "pixels") -> PendingImage:
    """Nested lists with their shape read from the first element at each depth, nothing converted: a
    rectangular list has exactly this shape, and any other fails when decoded (np.asarray refuses ragged lists)."""
    shape = []
    node = pixels
    while isinstance(node, list) and node and len(shape) < 3:
        shape.append(len(node))
        node = node[0]
    if len(shape) == 2 and not isinstance(node, list):
        shape.append(1)
    if len(shape) != 3 or isinstance(node, list) or shape[2] not in (1, 3, 4):
        # Not H×W or H×W×C (C = 1, 3, 4): converting it raises the precise error, costing no more than the JSON did.
        array = pixels_to_array(pixels, max_side=max_side, field=field)
        return PendingImage(1, array.shape[0], array.shape[1], array.shape[2], field, lambda: array)
    height, width, channels = shape
    _check_side(height, width, max_side=max_side, field=field)
    return PendingImage(1, height, width, min(channels, 3), field,
                        functools.partial(pixels_to_array, pixels, max_side=max_side, field=field))


def pixels_to_array(pixels: Any, *, max_side: int, field: str = "pixels") -> np.ndarray:
    """A nested list H×W or H×W×C (C = 1, 3 or 4) of numbers in [0, 1] as float32 H×W×C."""
    try:
        array = np.asarray(pixels)
    except (ValueError, TypeError):
        array = None
    if array is None or array.dtype.kind not in "iuf" or array.ndim not in (2, 3):
        received = (
            "a ragged (non-rectangular) or mixed list"
            if array is None or array.dtype == object
            else f"an array of dtype {array.dtype} with shape {list(array.shape)}"
        )
        raise InvalidImage(
            f"{field} must be a rectangular H×W or H×W×C array of numbers. Expected nested lists of numbers in [0, 1]. "
            f"Received: {received}"
        )
    if array.ndim == 2:
        array = array[:, :, None]
    return check_pixel_array(array.astype(np.float32, copy=False), max_side=max_side, field=field)


def open_raw_array(data: str, shape: list[int], dtype: str, *, max_side: int, field: str = "array") -> PendingImage:
    """A base64 buffer with its declared shape checked (channels, sides); the base64 is decoded by decode()."""
    if len(shape) not in (2, 3, 4):
        raise InvalidImage(f"{field}.shape must be (H, W), (H, W, C) or (N, H, W, C). Received: shape={shape}")
    count = shape[0] if len(shape) == 4 else 1
    height, width, channels = (*shape[-2:], 1) if len(shape) == 2 else shape[-3:]
    if channels not in (1, 3, 4):
        raise InvalidImage(
            f"{field} has {channels} channels. Expected 1 (gray), 3 (RGB) or 4 (RGBA) as the last axis. "
            f"Received: shape={list(shape)}"
        )
    _check_side(height, width, max_side=max_side, field=field)
    return PendingImage(count, height, width, min(channels, 3), field,
                        functools.partial(decode_raw_array, data, shape, dtype, max_side=max_side, field=field))


def decode_raw_array(data: str, shape: list[int], dtype: str, *, max_side: int, field: str = "array") -> np.ndarray:
    """A base64 little-endian float32 or uint8 buffer with the given shape as float32 (..., H, W, C) in [0, 1].

    float32 buffers are viewed, not copied. `shape` is (H, W), (H, W, C) or (N, H, W, C).
    """
    raw = decode_base64(data, field=f"{field}.data")
    element = np.dtype("<f4") if dtype == "float32" else np.dtype(np.uint8)
    expected_bytes = math.prod(shape) * element.itemsize  # Python ints: a product of large sides cannot wrap
    if len(raw) != expected_bytes:
        raise InvalidImage(
            f"{field}.data does not match its shape and dtype. Expected {expected_bytes} bytes for shape={shape} "
            f"{dtype}. Received: {len(raw)} bytes"
        )
    array = np.frombuffer(raw, dtype=element).reshape(shape)
    if len(shape) == 2:
        array = array[:, :, None]
    if element == np.uint8:
        array = np.divide(array, np.float32(255), dtype=np.float32)
    else:
        array = array.astype(np.float32, copy=False)  # native float32 view on little-endian machines
    return check_pixel_array(array, max_side=max_side, field=field)


def check_pixel_array(array: np.ndarray, *, max_side: int, field: str) -> np.ndarray:
    """Check a float32 (..., H, W, C) array: channels 1, 3 or 4 (alpha dropped), sides, finite, in [0, 1]."""
    height, width, channels = array.shape[-3:]
    if channels not in (1, 3, 4):
        raise InvalidImage(
            f"{field} has {channels} channels. Expected 1 (gray), 3 (RGB) or 4 (RGBA) as the last axis. "
            f"Received: shape={list(array.shape)}"
        )
    _check_side(height, width, max_side=max_side, field=field)
    if channels == 4:
        array = array[..., :3]
    finite = np.isfinite(array)
    if not finite.all():
        raise InvalidImage(
            f"{field} contains NaN or infinity. Expected finite values in [0, 1]. "
            f"Received: {int(array.size - np.count_nonzero(finite))} non-finite values"
        )
    low, high = float(array.min()), float(array.max())
    if low < 0.0 or high > 1.0:
        raise InvalidImage(
            f"{field} has values outside [0, 1]. Expected pixel intensities in [0, 1] (divide 8-bit values by 255). "
            f"Received: min={low:.4g}, max={high:.4g}"
        )
    return array


def _check_side(height: int, width: int, *, max_side: int, field: str) -> None:
    if height < 1 or width < 1:
        raise InvalidImage(f"{field} is empty. Expected at least 1×1 pixels. Received: {height}×{width}")
    if max(height, width) > max_side:
        raise PayloadTooLarge(
            f"{field} is too large. Expected sides of at most {max_side} pixels (DAE_MAX_IMAGE_SIDE). "
            f"Received: {height}×{width}"
        )


# ---------------------------------------------------------------------------------------------
# Channels
# ---------------------------------------------------------------------------------------------


def to_channels(images: np.ndarray, channels: int, *, field: str = "image") -> np.ndarray:
    """Convert (..., H, W, C) images to `channels` channels: RGB → luminance (BT.601), gray → replicated RGB."""
    have = images.shape[-1]
    if have == channels:
        return images
    if have == 3 and channels == 1:
        return np.matmul(images, LUMA_WEIGHTS)[..., None]
    if have == 1 and channels == 3:
        return np.broadcast_to(images, (*images.shape[:-1], 3))
    raise InvalidImage(
        f"{field} has {have} channels and the model takes {channels}. Expected 1 or 3 channels. "
        f"Received: shape={list(images.shape)}"
    )


# ---------------------------------------------------------------------------------------------
# Encoding
# ---------------------------------------------------------------------------------------------


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(data, zlib.crc32(tag)))


_PNG_IEND = _png_chunk(b"IEND", b"")
_PNG_COLOR_TYPES = {1: 0, 3: 2}  # channels -> PNG colour type (gray, RGB)
_HEATMAP_PLTE = _png_chunk(b"PLTE", HEATMAP_LUT.tobytes())  # colour type 3 (palette) uses it


@functools.lru_cache(maxsize=256)
def _png_prefix(width: int, height: int, color_type: int) -> tuple[bytes, str | None]:
    """Signature, IHDR and (palette images) PLTE of an 8-bit PNG, and their base64 when it can be reused.

    The same few sizes repeat, so both are cached. The prefix is 33 bytes (813 with the 768-byte palette), a
    multiple of 3, so base64(prefix + rest) == base64(prefix) + base64(rest): a response encodes only the rest.
    """
    prefix = _PNG_SIGNATURE + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0))
    if color_type == 3:
        prefix += _HEATMAP_PLTE
    return prefix, (base64_text(prefix) if len(prefix) % 3 == 0 else None)


def _png_rest(rows: np.ndarray) -> bytes:
    """IDAT and IEND of filtered rows (see png_rows): stored when small, else zlib level PNG_COMPRESS_LEVEL.

    Written with zlib instead of Pillow because Pillow's encoder costs ~0.4 ms per small image in set-up alone,
    several times the whole denoising of a 28x28 image; readers of the PNG cannot tell the difference.
    """
    data = memoryview(np.ascontiguousarray(rows)).cast("B")
    if len(data) <= PNG_STORE_BELOW_BYTES:
        return _stored_idat(data) + _PNG_IEND
    return _png_chunk(b"IDAT", zlib.compress(data, PNG_COMPRESS_LEVEL)) + _PNG_IEND


def _png_bytes(rows: np.ndarray, width: int, color_type: int) -> bytes:
    """An 8-bit PNG of filtered rows (palette: the heatmap's, for colour type 3)."""
    return _png_prefix(width, len(rows), color_type)[0] + _png_rest(rows)


def _png_base64(rows: np.ndarray, width: int, color_type: int) -> str:
    """base64 text of _png_bytes(rows, width, color_type), reusing the prefix's cached base64."""
    prefix, prefix_text = _png_prefix(width, len(rows), color_type)
    if prefix_text is None:
        return base64_text(prefix + _png_rest(rows))
    return prefix_text + base64_text(_png_rest(rows))


_ZLIB_STORED_HEADER = b"\x78\x01"  # deflate, 32 KiB window, no preset dictionary, "fastest" (FCHECK valid)
_STORED_BLOCK_MAX = 65535


@functools.lru_cache(maxsize=256)
def _stored_idat_head(length: int) -> tuple[bytes, int]:
    """What precedes `length` bytes of pixels in a stored IDAT chunk (chunk length, tag, zlib header, the one
    stored block's header), and the CRC-32 of its part that the chunk CRC covers. Constant per size, so cached."""
    head = _ZLIB_STORED_HEADER + struct.pack("<BHH", 1, length, length ^ 0xFFFF)  # 1: the final block
    return struct.pack(">I", len(head) + length + 4) + b"IDAT" + head, zlib.crc32(b"IDAT" + head)


def _stored_idat(data: memoryview) -> bytes:
    """The IDAT chunk of at most 65,535 bytes of pixel data in one stored (uncompressed) deflate block: byte for
    byte _png_chunk(b"IDAT", zlib.compress(data, 0)), without deflateInit, which clears a 64 KiB hash table per
    call, and with the two checksums as the only passes over the data besides the one copy into the chunk."""
    if len(data) > _STORED_BLOCK_MAX:
        raise ValueError(f"Expected at most {_STORED_BLOCK_MAX} bytes for one stored block. Received: {len(data)}")
    head, head_crc = _stored_idat_head(len(data))
    adler = zlib.adler32(data).to_bytes(4, "big")
    crc = zlib.crc32(adler, zlib.crc32(data, head_crc)).to_bytes(4, "big")
    return b"".join((head, data, adler, crc))


def _filtered_rows(values: np.ndarray) -> np.ndarray:
    """(N, H, 1 + R) uint8 from (N, H, R) float values already scaled to [0, 255.5): each row led by PNG filter
    type 0 (None), the values truncated after the caller's +0.5, i.e. rounded."""
    rows = np.empty((*values.shape[:2], 1 + values.shape[2]), np.uint8)
    rows[:, :, 0] = 0
    rows[:, :, 1:] = values
    return rows


def png_rows(images: np.ndarray) -> np.ndarray:
    """PNG-ready rows of float images (N, H, W, C) in [0, 1]: (N, H, 1 + W·C) uint8, rounded to 8 bits.

    One vectorized pass for a whole batch (the inference engine prepares them per micro-batch, off the event loop);
    png_from_rows then only compresses and frames one image."""
    count, height = images.shape[:2]
    scaled = np.multiply(images.reshape(count, height, -1), np.float32(255), dtype=np.float32)
    scaled += 0.5
    return _filtered_rows(scaled)


def heatmap_rows(error_maps: np.ndarray, maxima: np.ndarray) -> np.ndarray:
    """PNG-ready palette indices of (N, H, W) error maps: 0 → 0, each map's maximum → 255 (see heatmap_png)."""
    maxima = np.asarray(maxima, dtype=np.float64)
    # The scale in float64, then float32: the same numbers as heatmap_png's Python-float scale.
    scale = np.divide(255.0, maxima, out=np.zeros_like(maxima), where=maxima > 0).astype(np.float32)
    indices = np.multiply(error_maps, scale[:, None, None], dtype=np.float32)
    np.minimum(indices, 255, out=indices)  # error maps are >= 0: only the top needs clipping
    indices += 0.5
    return _filtered_rows(indices)


def _color_type(rows: np.ndarray, width: int) -> int:
    channels = (rows.shape[1] - 1) // width
    if channels not in _PNG_COLOR_TYPES:
        raise ValueError(f"Expected an image with 1 or 3 channels. Received: {channels} channels")
    return _PNG_COLOR_TYPES[channels]


def png_from_rows(rows: np.ndarray, width: int) -> bytes:
    """The PNG of one image's rows from png_rows (gray or RGB, from the row length)."""
    return _png_bytes(rows, width, _color_type(rows, width))


def png_base64_from_rows(rows: np.ndarray, width: int) -> str:
    """base64 text of png_from_rows(rows, width)."""
    return _png_base64(rows, width, _color_type(rows, width))


def heatmap_png_from_rows(rows: np.ndarray, width: int) -> bytes:
    """The inferno palette PNG of one error map's rows from heatmap_rows."""
    return _png_bytes(rows, width, 3)


def heatmap_png_base64_from_rows(rows: np.ndarray, width: int) -> str:
    """base64 text of heatmap_png_from_rows(rows, width)."""
    return _png_base64(rows, width, 3)


def encode_png(image: np.ndarray) -> bytes:
    """PNG bytes of a float image in [0, 1], H×W, H×W×1 (gray) or H×W×3 (RGB), rounded to 8 bits."""
    channels = 1 if image.ndim == 2 else image.shape[2]
    if channels not in _PNG_COLOR_TYPES:
        raise ValueError(f"Expected an image with 1 or 3 channels. Received: shape={list(image.shape)}")
    return png_from_rows(png_rows(image.reshape(1, *image.shape[:2], channels))[0], image.shape[1])


def base64_text(data: bytes) -> str:
    """Standard base64 of `data` as text (what JSON responses carry)."""
    return pybase64.b64encode_as_string(data)


def encode_png_base64(image: np.ndarray) -> str:
    """base64 text of `encode_png(image)`."""
    return base64_text(encode_png(image))


def float32_base64(array: np.ndarray) -> str:
    """base64 of the array's little-endian float32 bytes, row-major (the compact response format)."""
    contiguous = np.ascontiguousarray(array, dtype="<f4")
    return pybase64.b64encode_as_string(memoryview(contiguous).cast("B"))


def heatmap_png(error_map: np.ndarray, vmax: float | None = None) -> bytes:
    """A palette PNG of an H×W error map in the inferno colormap; 0 is black, `vmax` (default: the map's max) white-yellow."""
    top = float(np.maximum.reduce(error_map, axis=None)) if vmax is None else float(vmax)
    return heatmap_png_from_rows(heatmap_rows(error_map[None], np.array([top]))[0], error_map.shape[1])
