"""Decoding and encoding images through maintained libraries: Pillow's public API reads every header (sizes are
known before any pixel is decoded) and decodes JPEG and the rarer PNG modes; imagecodecs (libpng) decodes the
common 8-bit PNGs and encodes every PNG the gateway answers with (bench/README.md has the measurements).

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
import warnings
from collections.abc import Callable
from typing import Any

import imagecodecs
import numpy as np
import pybase64
from PIL import Image, PngImagePlugin, UnidentifiedImageError

from dae.errors import InvalidImage, PayloadTooLarge

#: ITU-R BT.601 luma weights, used to turn RGB into the single channel of a grayscale model.
LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114], dtype=np.float32)

#: The PNGs the gateway writes are stored (deflate level 0, no row filter), as before the maintained codec: deflate
#: level 1 with libpng's adaptive filter costs 3-6x the CPU of a 28x28 answer and 30x at 512x512, for 10-45% fewer
#: bytes (bench/README.md, 2026-12-03).
PNG_COMPRESS_LEVEL = imagecodecs.PNG.COMPRESSION.NO
PNG_FILTER = imagecodecs.PNG.FILTER.NONE

_ACCEPTED_FORMATS = ("PNG", "JPEG")
#: Pillow modes that decode to one channel (alpha is dropped; 16- and 32-bit gray stay gray).
_GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "F"})
#: 8-bit PNG modes imagecodecs decodes to exactly Pillow's pixels; the other modes go through Pillow.
_LIBPNG_MODES = frozenset({"L", "LA", "RGB", "RGBA"})
_DATA_URL_SEPARATOR = ";base64,"
_PNG_END = b"IEND"
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"




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
    """PNG or JPEG bytes with their header read (Pillow's lazy open, which reads only the header, e.g. a PNG's IHDR
    or a JPEG's SOF) and the side limit checked; PayloadTooLarge or InvalidImage before any pixel is decoded."""
    if not content:
        raise InvalidImage(f"{field} is empty. Expected the bytes of a PNG or JPEG image. Received: 0 bytes")
    image = _open_with_pillow(content, max_side=max_side, field=field)
    width, height = image.size
    _check_side(height, width, max_side=max_side, field=field)
    channels = 1 if image.mode in _GRAY_MODES else 3
    return PendingImage(1, height, width, channels, field, functools.partial(_decode, image, content, field=field))


def decode_image_bytes(content: bytes, *, max_side: int, field: str = "image") -> np.ndarray:
    """Decode PNG or JPEG bytes to float32 H×W×C in [0, 1] (C = 1 or 3; alpha dropped)."""
    return open_image_bytes(content, max_side=max_side, field=field).decode()


def _decode(image: Image.Image, content: bytes, *, field: str) -> np.ndarray:
    """The pixels of an image opened by _open_with_pillow: libpng for the common 8-bit PNGs, else Pillow."""
    if image.format == "PNG" and content.rfind(_PNG_END) == -1:
        # Decoders accept a PNG cut after its pixel data without complaint; a file without IEND is truncated.
        raise InvalidImage(
            f"{field} could not be decoded (truncated PNG: no IEND chunk). Expected a complete image file. "
            f"Received: {len(content)} bytes"
        )
    if image.format != "PNG" or image.mode not in _LIBPNG_MODES:
        return _load_pillow(image, content, field=field)
    try:
        pixels = imagecodecs.png_decode(content)
    except (imagecodecs.PngError, ValueError) as error:  # libpng's message may not even decode (ValueError)
        raise InvalidImage(
            f"{field} could not be decoded (truncated or corrupt PNG). Expected a complete image file. "
            f"Received: {len(content)} bytes ({error})"
        ) from None
    if pixels.dtype != np.uint8:  # a header Pillow read one way and libpng another: Pillow decides
        return _load_pillow(image, content, field=field)
    return _uint8_to_float(pixels if pixels.ndim == 3 else pixels[:, :, None])


def _open_with_pillow(content: bytes, *, max_side: int, field: str) -> Image.Image:
    """Pillow's lazy open (header only) of PNG or JPEG bytes; InvalidImage for anything else."""
    try:
        if content.startswith(_PNG_SIGNATURE):
            # Pillow's PNG reader directly: Image.open's format probing costs more than the header itself.
            image: Image.Image = PngImagePlugin.PngImageFile(io.BytesIO(content))
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
    """The pixels of an image opened by _open_with_pillow (sides already checked), decoded by Pillow."""
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
        scaled: np.ndarray = np.divide(pixels, np.float32(65535), dtype=np.float32)
        return scaled[:, :, None]
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
    scaled: np.ndarray = np.divide(pixels, np.float32(255), dtype=np.float32)
    return scaled


def open_base64_image(data: str, *, max_side: int, field: str = "image") -> PendingImage:
    """A base64 PNG/JPEG with its header read (see open_image_bytes)."""
    return open_image_bytes(decode_base64(data, field=field), max_side=max_side, field=field)


def decode_base64_image(data: str, *, max_side: int, field: str = "image") -> np.ndarray:
    """Decode a base64 PNG/JPEG to float32 H×W×C in [0, 1]."""
    return open_base64_image(data, max_side=max_side, field=field).decode()


def open_pixels(pixels: Any, *, max_side: int, field: str = "pixels") -> PendingImage:
    """Nested lists with their shape read from the first element at each depth, nothing converted: a
    rectangular list has exactly this shape, and any other fails when decoded (np.asarray refuses ragged lists)."""
    shape: list[int] = []
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
    # Two reductions on the common path: NaN propagates through both, so any non-finite value fails the range test.
    low, high = float(np.minimum.reduce(array, axis=None)), float(np.maximum.reduce(array, axis=None))
    if low >= 0.0 and high <= 1.0:
        return array
    finite = np.isfinite(array)
    if not finite.all():
        raise InvalidImage(
            f"{field} contains NaN or infinity. Expected finite values in [0, 1]. "
            f"Received: {int(array.size - np.count_nonzero(finite))} non-finite values"
        )
    raise InvalidImage(
        f"{field} has values outside [0, 1]. Expected pixel intensities in [0, 1] (divide 8-bit values by 255). "
        f"Received: min={low:.4g}, max={high:.4g}"
    )


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
        luma: np.ndarray = np.matmul(images, LUMA_WEIGHTS)
        return luma[..., None]
    if have == 1 and channels == 3:
        return np.broadcast_to(images, (*images.shape[:-1], 3))
    raise InvalidImage(
        f"{field} has {have} channels and the model takes {channels}. Expected 1 or 3 channels. "
        f"Received: shape={list(images.shape)}"
    )



# ---------------------------------------------------------------------------------------------
# Encoding
# ---------------------------------------------------------------------------------------------


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Float images in [0, 1] rounded to 8 bits (half up), any shape."""
    scaled = np.multiply(images, np.float32(255), dtype=np.float32)
    scaled += 0.5
    rounded: np.ndarray = scaled.astype(np.uint8)
    return rounded


def png_of_uint8(pixels: np.ndarray) -> bytes:
    """The PNG of uint8 pixels H×W, H×W×1 (gray) or H×W×3 (RGB)."""
    if pixels.ndim == 3 and pixels.shape[2] == 1:
        pixels = pixels[:, :, 0]
    elif pixels.ndim != 2 and (pixels.ndim != 3 or pixels.shape[2] != 3):
        raise ValueError(f"Expected an image with 1 or 3 channels. Received: shape={list(pixels.shape)}")
    return bytes(imagecodecs.png_encode(np.ascontiguousarray(pixels), level=PNG_COMPRESS_LEVEL, filter=PNG_FILTER))


def encode_png(image: np.ndarray) -> bytes:
    """PNG bytes of a float image in [0, 1], H×W, H×W×1 (gray) or H×W×3 (RGB), rounded to 8 bits."""
    return png_of_uint8(to_uint8(image))


def base64_text(data: bytes) -> str:
    """Standard base64 of `data` as text (what JSON responses carry)."""
    return pybase64.b64encode_as_string(data)


def encode_png_base64(image: np.ndarray) -> str:
    """base64 text of `encode_png(image)`."""
    return base64_text(encode_png(image))


def float32_base64(array: np.ndarray) -> str:
    """base64 of the array's little-endian float32 bytes, row-major (the compact response format)."""
    contiguous = np.ascontiguousarray(array, dtype="<f4")
    return pybase64.b64encode_as_string(contiguous.data.cast("B"))
