"""PNG decoding through the maintained codecs: Pillow's own pixels on every mode and encoder option, every malformed
file a clean InvalidImage, sizes from the header before anything is decoded (behaviour, not the PNG format)."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from dae.errors import InvalidImage
from service.imaging.codec import decode_image_bytes, encode_png, open_image_bytes

RNG = np.random.default_rng(7)
CHANNELS = {"L": 1, "LA": 2, "RGB": 3, "RGBA": 4}


def png_bytes(image: Image.Image, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **options)
    return buffer.getvalue()


def smooth_image(mode: str, height: int, width: int) -> Image.Image:
    """Gradients plus noise: Pillow's adaptive filtering then uses Sub, Up, Average and Paeth rows."""
    rows = np.linspace(0, 200, height)[:, None, None]
    columns = np.linspace(0, 50, width)[None, :, None]
    noise = RNG.integers(0, 6, (height, width, CHANNELS[mode]))
    pixels = np.clip(rows + columns + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels[..., 0] if mode == "L" else pixels, mode)


def pillow_floats(content: bytes) -> np.ndarray:
    """Pillow's pixels as the gateway's convention: float32 in [0, 1], alpha dropped."""
    with Image.open(io.BytesIO(content)) as image:
        pixels = np.asarray(image).reshape(image.height, image.width, -1)
    keep = 1 if pixels.shape[2] in (1, 2) else 3
    return (pixels[..., :keep] / np.float32(255)).astype(np.float32)


@pytest.mark.parametrize("mode", sorted(CHANNELS))
@pytest.mark.parametrize("size", [(1, 1), (28, 28), (17, 33)])
@pytest.mark.parametrize("options", [{}, {"optimize": True}, {"compress_level": 0}, {"compress_level": 9}])
def test_same_pixels_as_pillow(mode, size, options):
    content = png_bytes(smooth_image(mode, *size), **options)
    decoded = decode_image_bytes(content, max_side=64)
    assert decoded.dtype == np.float32 and decoded.shape == (*size, 1 if mode in ("L", "LA") else 3)
    np.testing.assert_array_equal(decoded, pillow_floats(content))


def test_ancillary_chunks_split_pixel_data_and_interlacing_are_read():
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", "made by a test")
    with_text = png_bytes(smooth_image("L", 9, 9), pnginfo=info, transparency=3, dpi=(72, 72))
    np.testing.assert_array_equal(decode_image_bytes(with_text, max_side=64), pillow_floats(with_text))
    big = png_bytes(Image.fromarray(RNG.integers(0, 256, (300, 300, 3), dtype=np.uint8)))
    assert big.count(b"IDAT") > 1, "Pillow should split this image's pixel data over several IDAT chunks"
    np.testing.assert_array_equal(decode_image_bytes(big, max_side=512), pillow_floats(big))


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("size", [(1, 1), (28, 28), (64, 96)])
def test_encoded_pngs_round_trip_and_pillow_reads_them(channels, size):
    pixels = RNG.integers(0, 256, (*size, channels), dtype=np.uint8)
    content = encode_png(pixels.astype(np.float32) / 255)
    with Image.open(io.BytesIO(content)) as image:
        assert image.format == "PNG" and image.mode == ("L" if channels == 1 else "RGB")
        np.testing.assert_array_equal(np.asarray(image).reshape(*size, channels), pixels)
    np.testing.assert_array_equal(decode_image_bytes(content, max_side=128) * 255, pixels.astype(np.float32))


def with_ihdr(content: bytes, **changes: int) -> bytes:
    """A copy of the PNG with IHDR fields changed and its CRC recomputed."""
    fields = dict(zip(("width", "height", "depth", "color", "compression", "filter", "interlace"),
                      struct.unpack(">IIBBBBB", content[16:29]), strict=True))
    fields.update(changes)
    header = struct.pack(">IIBBBBB", *fields.values())
    crc = struct.pack(">I", zlib.crc32(b"IHDR" + header))
    return content[:16] + header + crc + content[33:]


GRAY = png_bytes(smooth_image("L", 8, 8))


def garbage_pixels(content: bytes) -> bytes:
    """The PNG with its pixel data replaced by bytes that do not inflate (chunk CRC valid)."""
    start = content.index(b"IDAT") + 4
    (length,) = struct.unpack(">I", content[start - 8 : start - 4])
    garbage = b"\x78\x9c" + bytes(range(length - 2))
    return content[:start] + garbage + struct.pack(">I", zlib.crc32(b"IDAT" + garbage)) + content[start + length + 4 :]


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (GRAY[:-12], "truncated: no IEND"),
        (GRAY[:20], "truncated inside IHDR"),
        (GRAY[:40] + bytes([GRAY[40] ^ 0xFF]) + GRAY[41:], "CRC mismatch"),
        (GRAY[:33] + struct.pack(">I", 0) + b"ZZZZ" + struct.pack(">I", zlib.crc32(b"ZZZZ")) + GRAY[33:],
         "unknown critical chunk"),
        (garbage_pixels(GRAY), "corrupt pixel data"),
    ],
)
def test_malformed_pngs_are_invalid_images(content, why):
    with pytest.raises(InvalidImage, match="could not be decoded|not a readable image"):
        decode_image_bytes(content, max_side=64)
        pytest.fail(f"decoded a PNG with {why}")


PILLOW_CHANNELS_DECODED = {"L": 1, "LA": 1, "RGB": 3, "RGBA": 3, "P": 3, "I;16": 1, "1": 1}


@pytest.mark.parametrize(
    "image",
    [
        smooth_image("L", 5, 7), smooth_image("LA", 5, 7), smooth_image("RGB", 5, 7), smooth_image("RGBA", 5, 7),
        smooth_image("RGB", 5, 7).convert("P"), Image.fromarray(RNG.integers(0, 65535, (5, 7), dtype=np.uint16)),
        Image.fromarray(RNG.integers(0, 2, (5, 7), dtype=bool)),
    ],
    ids=lambda image: image.mode,
)
def test_the_header_gives_the_size_and_the_channels_decoding_will_give(image):
    pending = open_image_bytes(png_bytes(image), max_side=64)
    assert (pending.height, pending.width, pending.channels) == (5, 7, PILLOW_CHANNELS_DECODED[image.mode])
    assert pending.decode().shape == (5, 7, PILLOW_CHANNELS_DECODED[image.mode])


def test_a_huge_image_is_refused_from_its_header_alone():
    """IHDR says 4096x4096, the pixel data is garbage: 413 from the header; nothing is inflated."""
    corrupt = garbage_pixels(GRAY)
    huge = with_ihdr(corrupt, width=4096, height=4096)
    with pytest.raises(Exception, match=r"at most 2048 pixels \(DAE_MAX_IMAGE_SIDE\). Received: 4096×4096"):
        open_image_bytes(huge, max_side=2048)
    pending = open_image_bytes(with_ihdr(corrupt, width=2048, height=1024), max_side=2048)
    assert (pending.count, pending.height, pending.width, pending.channels, pending.values) == (1, 1024, 2048, 1,
                                                                                                2048 * 1024)
    with pytest.raises(Exception, match="could not be decoded|not a readable image"):
        pending.decode()  # only decoding finds the garbage
