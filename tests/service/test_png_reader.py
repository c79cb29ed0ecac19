"""The fast PNG reader: the same pixels as Pillow's reader on every file it accepts, None on every file it does not."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from service.images import decode_image_bytes, open_image_bytes
from service.png_reader import read_png_header, read_simple_png

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


def pillow_pixels(content: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(content)) as image:
        return np.asarray(image).reshape(image.height, image.width, -1)


def paeth(left: int, up: int, up_left: int) -> int:
    estimate = left + up - up_left
    distances = (abs(estimate - left), abs(estimate - up), abs(estimate - up_left))
    return (left, up, up_left)[distances.index(min(distances))]


def filtered_png(pixels: np.ndarray, color_type: int, filters: list[int]) -> bytes:
    """An 8-bit PNG whose row i uses PNG filter filters[i % len(filters)] (written here, not by Pillow)."""
    height, width, channels = pixels.shape
    rows = pixels.reshape(height, width * channels).astype(int).tolist()
    previous = [0] * (width * channels)
    raw = bytearray()
    for index, row in enumerate(rows):
        kind = filters[index % len(filters)]
        out = []
        for x, value in enumerate(row):
            left = row[x - channels] if x >= channels else 0
            up_left = previous[x - channels] if x >= channels else 0
            predictor = (0, left, previous[x], (left + previous[x]) // 2, paeth(left, previous[x], up_left))[kind]
            out.append((value - predictor) % 256)
        raw += bytes([kind, *out])
        previous = row

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    header = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(bytes(raw))) + chunk(b"IEND", b"")


@pytest.mark.parametrize("mode", sorted(CHANNELS))
@pytest.mark.parametrize("size", [(1, 1), (28, 28), (17, 33)])
@pytest.mark.parametrize("options", [{}, {"optimize": True}, {"compress_level": 0}, {"compress_level": 9}])
def test_same_pixels_as_pillow(mode, size, options):
    content = png_bytes(smooth_image(mode, *size), **options)
    pixels = read_simple_png(content, max_side=64)
    assert pixels is not None
    assert pixels.dtype == np.uint8 and pixels.shape == (*size, CHANNELS[mode])
    np.testing.assert_array_equal(pixels, pillow_pixels(content))


@pytest.mark.parametrize(("color_type", "channels"), [(0, 1), (4, 2), (2, 3), (6, 4)])
def test_every_row_filter_type_is_decoded(color_type, channels):
    pixels = RNG.integers(0, 256, (12, 9, channels), dtype=np.uint8)
    content = filtered_png(pixels, color_type, filters=[0, 1, 2, 3, 4, 4, 3, 2, 1])
    np.testing.assert_array_equal(pillow_pixels(content), pixels)  # the hand-made file is valid
    np.testing.assert_array_equal(read_simple_png(content, max_side=64), pixels)


def test_ancillary_chunks_and_split_pixel_data_are_read():
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", "made by a test")
    with_text = png_bytes(smooth_image("L", 9, 9), pnginfo=info, transparency=3, dpi=(72, 72))
    np.testing.assert_array_equal(read_simple_png(with_text, max_side=64), pillow_pixels(with_text))
    big = png_bytes(Image.fromarray(RNG.integers(0, 256, (300, 300, 3), dtype=np.uint8)))
    assert big.count(b"IDAT") > 1, "Pillow should split this image's pixel data over several IDAT chunks"
    np.testing.assert_array_equal(read_simple_png(big, max_side=512), pillow_pixels(big))


def test_decoded_floats_equal_the_pillow_path():
    """decode_image_bytes via the fast reader equals the Pillow path (divided by 255, alpha dropped)."""
    for mode in CHANNELS:
        content = png_bytes(smooth_image(mode, 6, 5))
        expected = pillow_pixels(content)[..., : 1 if mode in ("L", "LA") else 3] / np.float32(255)
        decoded = decode_image_bytes(content, max_side=64)
        assert decoded.dtype == np.float32
        np.testing.assert_array_equal(decoded, expected.astype(np.float32))


def with_ihdr(content: bytes, **changes: int) -> bytes:
    """A copy of the PNG with IHDR fields changed and its CRC recomputed."""
    fields = dict(zip(("width", "height", "depth", "color", "compression", "filter", "interlace"),
                      struct.unpack(">IIBBBBB", content[16:29]), strict=True))
    fields.update(changes)
    header = struct.pack(">IIBBBBB", *fields.values())
    crc = struct.pack(">I", zlib.crc32(b"IHDR" + header))
    return content[:16] + header + crc + content[33:]


GRAY = png_bytes(smooth_image("L", 8, 8))


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (png_bytes(smooth_image("RGB", 8, 8).convert("P")), "palette"),
        (png_bytes(Image.fromarray(RNG.integers(0, 65535, (8, 8), dtype=np.uint16))), "16-bit"),
        (png_bytes(Image.fromarray(RNG.integers(0, 2, (8, 8), dtype=bool))), "1-bit"),
        (with_ihdr(GRAY, interlace=1), "interlaced"),
        (GRAY[:-12], "truncated: no IEND"),
        (GRAY[:20], "truncated inside IHDR"),
        (GRAY[:40] + bytes([GRAY[40] ^ 0xFF]) + GRAY[41:], "CRC mismatch"),
        (b"\xff\xd8\xff\xe0 a JPEG", "not a PNG"),
        (GRAY[:33] + struct.pack(">I", 0) + b"ZZZZ" + struct.pack(">I", zlib.crc32(b"ZZZZ")) + GRAY[33:],
         "unknown critical chunk"),
    ],
)
def test_files_it_does_not_handle_return_none(content, why):
    assert read_simple_png(content, max_side=64) is None, why


def test_side_over_the_limit_returns_none_before_decoding():
    assert read_simple_png(GRAY, max_side=7) is None
    assert read_simple_png(GRAY, max_side=8) is not None


def test_corrupt_pixel_data_returns_none_and_the_full_reader_explains():
    start = GRAY.index(b"IDAT") + 4
    (length,) = struct.unpack(">I", GRAY[start - 8 : start - 4])
    garbage = b"\x78\x9c" + bytes(range(length - 2))
    crc = struct.pack(">I", zlib.crc32(b"IDAT" + garbage))
    corrupt = GRAY[:start] + garbage + crc + GRAY[start + length + 4 :]
    assert read_simple_png(corrupt, max_side=64) is None
    with pytest.raises(Exception, match="could not be decoded|not a readable image"):
        decode_image_bytes(corrupt, max_side=64)


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
    content = png_bytes(image)
    assert read_png_header(content) == (5, 7, PILLOW_CHANNELS_DECODED[image.mode])
    assert decode_image_bytes(content, max_side=64).shape == (5, 7, PILLOW_CHANNELS_DECODED[image.mode])


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (GRAY[:32], "shorter than signature + IHDR"),
        (GRAY[:29] + b"\0\0\0\0" + GRAY[33:], "IHDR CRC mismatch"),
        (GRAY[:8] + struct.pack(">I", 0) + b"tEXt" + struct.pack(">I", zlib.crc32(b"tEXt")) + GRAY[8:],
         "IHDR not the first chunk"),
        (with_ihdr(GRAY, color=5), "unknown colour type"),
        (b"\xff\xd8\xff\xe0" + bytes(40), "not a PNG"),
    ],
)
def test_the_header_reader_returns_none_for_anything_but_a_leading_valid_ihdr(content, why):
    assert read_png_header(content) is None, why


def test_a_huge_image_is_refused_from_its_ihdr_alone():
    """IHDR says 4096x4096, the pixel data is garbage: 413 from the header; nothing is inflated."""
    start = GRAY.index(b"IDAT") + 4
    (length,) = struct.unpack(">I", GRAY[start - 8 : start - 4])
    garbage = bytes(range(length))
    corrupt = GRAY[:start] + garbage + struct.pack(">I", zlib.crc32(b"IDAT" + garbage)) + GRAY[start + length + 4 :]
    huge = with_ihdr(corrupt, width=4096, height=4096)
    with pytest.raises(Exception, match=r"at most 2048 pixels \(DAE_MAX_IMAGE_SIDE\). Received: 4096×4096"):
        open_image_bytes(huge, max_side=2048)
    pending = open_image_bytes(with_ihdr(corrupt, width=2048, height=1024), max_side=2048)
    assert (pending.count, pending.height, pending.width, pending.channels, pending.values) == (1, 1024, 2048, 1,
                                                                                                2048 * 1024)
    with pytest.raises(Exception, match="could not be decoded|not a readable image"):
        pending.decode()  # only decoding finds the garbage
