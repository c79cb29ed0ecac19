"""Decoding and encoding images: formats, colour conversion, limits and every malformed input as a 4xx error."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from dae.errors import InvalidImage, PayloadTooLarge
from service.imaging.codec import (
    LUMA_WEIGHTS,
    decode_base64,
    decode_base64_image,
    decode_image_bytes,
    decode_raw_array,
    encode_png,
    float32_base64,
    open_base64_image,
    open_image_bytes,
    open_pixels,
    open_raw_array,
    pixels_to_array,
    to_channels,
)
from service.imaging.heatmap import HEATMAP_LUT, heatmap_png, heatmap_pngs_base64


def encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


RNG = np.random.default_rng(0)
GRAY_U8 = RNG.integers(0, 256, (5, 7), dtype=np.uint8)
RGB_U8 = RNG.integers(0, 256, (5, 7, 3), dtype=np.uint8)


def test_gray_png_decodes_to_hw1_divided_by_255():
    decoded = decode_image_bytes(encode(Image.fromarray(GRAY_U8)), max_side=64)
    assert decoded.dtype == np.float32 and decoded.shape == (5, 7, 1)
    np.testing.assert_array_equal(decoded[:, :, 0], GRAY_U8.astype(np.float32) / np.float32(255))


def test_rgb_and_rgba_png_keep_colour_and_drop_alpha():
    rgb = decode_image_bytes(encode(Image.fromarray(RGB_U8)), max_side=64)
    np.testing.assert_array_equal(rgb, RGB_U8.astype(np.float32) / np.float32(255))
    alpha = np.full((5, 7, 1), 7, np.uint8)
    rgba = decode_image_bytes(encode(Image.fromarray(np.concatenate([RGB_U8, alpha], axis=2))), max_side=64)
    np.testing.assert_array_equal(rgba, rgb)  # alpha dropped, not composited


def test_16_bit_png_is_divided_by_65535():
    values = np.array([[0, 65535], [32768, 1000]], dtype=np.uint16)
    decoded = decode_image_bytes(encode(Image.fromarray(values)), max_side=64)
    np.testing.assert_allclose(decoded[:, :, 0], values / 65535.0, atol=1e-7)


def test_palette_and_jpeg_decode_to_rgb():
    palette = Image.fromarray(RGB_U8).convert("P")
    assert decode_image_bytes(encode(palette), max_side=64).shape == (5, 7, 3)
    jpeg = decode_image_bytes(encode(Image.fromarray(RGB_U8), "JPEG"), max_side=64)
    assert jpeg.shape == (5, 7, 3) and 0 <= jpeg.min() and jpeg.max() <= 1


def test_base64_with_data_url_prefix_and_line_breaks():
    raw = encode(Image.fromarray(GRAY_U8))
    text = base64.b64encode(raw).decode()
    wrapped = "\n".join(text[i : i + 20] for i in range(0, len(text), 20))
    for variant in (text, "data:image/png;base64," + text, wrapped):
        np.testing.assert_array_equal(decode_base64_image(variant, max_side=64)[:, :, 0], GRAY_U8 / np.float32(255))


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "empty"),
        (b"definitely not an image", "not a readable image"),
        (encode(Image.fromarray(GRAY_U8), "GIF"), "unsupported format"),
    ],
)
def test_undecodable_bytes_are_invalid_images(content, message):
    with pytest.raises(InvalidImage, match=message):
        decode_image_bytes(content, max_side=64)


@pytest.mark.parametrize("keep", [0.5, 0.9, -12, -20])
def test_truncated_png_is_invalid_not_a_crash(keep):
    raw = encode(Image.fromarray(RNG.integers(0, 256, (64, 64), dtype=np.uint8)))
    cut = raw[: int(len(raw) * keep)] if keep > 0 else raw[:keep]
    with pytest.raises(InvalidImage, match="truncated"):
        decode_image_bytes(cut, max_side=128)


def test_image_over_the_side_limit_is_too_large_before_decoding():
    with pytest.raises(PayloadTooLarge, match=r"at most 32 pixels.*Received: 16×40"):
        decode_image_bytes(encode(Image.fromarray(np.zeros((16, 40), np.uint8))), max_side=32)


def test_invalid_base64_says_what_was_received():
    with pytest.raises(InvalidImage, match="not valid base64"):
        decode_base64("@@not base64@@", field="image")


def test_pixels_hw_and_hwc():
    pixels = [[0.0, 0.5], [1.0, 0.25]]
    np.testing.assert_array_equal(pixels_to_array(pixels, max_side=8)[:, :, 0], np.array(pixels, np.float32))
    assert pixels_to_array([[[0.1, 0.2, 0.3]]], max_side=8).shape == (1, 1, 3)
    assert pixels_to_array([[[0.1, 0.2, 0.3, 1.0]]], max_side=8).shape == (1, 1, 3)  # alpha dropped


@pytest.mark.parametrize(
    "pixels, message",
    [
        ([[0.1, 0.2], [0.3]], "ragged"),
        ([["a", "b"]], "dtype <U1"),
        ([[True, False]], "dtype bool"),
        ([0.1, 0.2], "shape \\[2\\]"),
        ([[float("nan"), 0.0]], "NaN or infinity"),
        ([[float("inf"), 0.0]], "NaN or infinity"),
        ([[1.5, 0.0]], "outside \\[0, 1\\]"),
        ([[-0.1, 0.0]], "outside \\[0, 1\\]"),
        ([[[0.1, 0.2]]], "2 channels"),
        ([], "shape \\[0\\]"),
    ],
)
def test_bad_pixel_arrays_are_invalid(pixels, message):
    with pytest.raises(InvalidImage, match=message):
        pixels_to_array(pixels, max_side=8)


def test_pixels_over_the_side_limit_are_too_large():
    with pytest.raises(PayloadTooLarge):
        pixels_to_array(np.zeros((4, 9)).tolist(), max_side=8)


def test_raw_float32_array_is_a_view_and_uint8_is_scaled():
    values = RNG.random((2, 3, 4, 1), dtype=np.float32)
    decoded = decode_raw_array(float32_base64(values), [2, 3, 4, 1], "float32", max_side=8)
    np.testing.assert_array_equal(decoded, values)
    assert not decoded.flags.owndata  # np.frombuffer view, no copy
    as_bytes = base64.b64encode(GRAY_U8.tobytes()).decode()
    np.testing.assert_array_equal(
        decode_raw_array(as_bytes, [5, 7], "uint8", max_side=8)[:, :, 0], GRAY_U8 / np.float32(255)
    )


def test_raw_array_with_the_wrong_byte_count_is_invalid():
    with pytest.raises(InvalidImage, match="Expected 64 bytes"):
        decode_raw_array(float32_base64(np.zeros(15, np.float32)), [4, 4], "float32", max_side=8)


def test_rgb_to_gray_uses_bt601_luminance_and_gray_to_rgb_replicates():
    rgb = RNG.random((1, 3, 4, 3), dtype=np.float32)
    gray = to_channels(rgb, 1)
    np.testing.assert_allclose(gray[..., 0], 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2], atol=1e-6)
    assert float(LUMA_WEIGHTS.sum()) == pytest.approx(1.0)
    replicated = to_channels(gray, 3)
    assert replicated.shape == (1, 3, 4, 3)
    for channel in range(3):
        np.testing.assert_array_equal(replicated[..., channel], gray[..., 0])
    with pytest.raises(InvalidImage, match="takes 2"):
        to_channels(rgb, 2)


def test_png_encoding_round_trips_8_bit_values():
    pixels = GRAY_U8.astype(np.float32) / 255
    decoded = np.asarray(Image.open(io.BytesIO(encode_png(pixels[:, :, None]))))
    np.testing.assert_array_equal(decoded, GRAY_U8)
    rgb = np.asarray(Image.open(io.BytesIO(encode_png(RGB_U8.astype(np.float32) / 255))))
    np.testing.assert_array_equal(rgb, RGB_U8)


def test_heatmap_maps_zero_to_black_and_the_max_to_the_top_colour():
    error = np.array([[0.0, 0.25], [0.5, 0.5]], np.float32)
    image = Image.open(io.BytesIO(heatmap_png(error))).convert("RGB")
    colours = np.asarray(image)
    np.testing.assert_array_equal(colours[0, 0], HEATMAP_LUT[0])
    np.testing.assert_array_equal(colours[1, 1], HEATMAP_LUT[255])
    np.testing.assert_array_equal(colours[0, 1], HEATMAP_LUT[128])
    assert HEATMAP_LUT[0].sum() < 10 and HEATMAP_LUT[255].sum() > 600  # dark to bright
    flat = np.asarray(Image.open(io.BytesIO(heatmap_png(np.zeros((2, 2), np.float32)))).convert("RGB"))
    assert (flat == HEATMAP_LUT[0]).all()  # a perfect reconstruction is all black, no division by zero


def test_float32_base64_round_trips():
    values = RNG.random((3, 5), dtype=np.float32)
    decoded = np.frombuffer(base64.b64decode(float32_base64(values)), "<f4").reshape(3, 5)
    np.testing.assert_array_equal(decoded, values)


def test_batch_heatmaps_are_the_files_of_each_map_alone():
    """Heatmaps are encoded per piece (one scaling pass for its maps): the same files as each map alone."""
    maps = RNG.random((3, 6, 5), dtype=np.float32)
    maps[1] = 0.0  # an exact reconstruction: all black, no division by zero
    maxima = maps.reshape(3, -1).max(axis=1)
    for index, text in enumerate(heatmap_pngs_base64(maps, maxima)):
        assert text == base64.b64encode(heatmap_png(maps[index], vmax=float(maxima[index]))).decode()
    black = np.asarray(Image.open(io.BytesIO(base64.b64decode(heatmap_pngs_base64(maps, maxima)[1]))).convert("RGB"))
    assert (black == HEATMAP_LUT[0]).all()


# ---------------------------------------------------------------------------------------------
# Headers before pixels: every opener knows the decoded size without decoding
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "shape"),
    [
        (encode(Image.fromarray(GRAY_U8)), (5, 7, 1)),
        (encode(Image.fromarray(RGB_U8).convert("RGBA")), (5, 7, 3)),
        (encode(Image.fromarray(RGB_U8), "JPEG"), (5, 7, 3)),
        (encode(Image.fromarray(GRAY_U8), "JPEG"), (5, 7, 1)),
        (encode(Image.fromarray(RGB_U8).convert("P")), (5, 7, 3)),
    ],
    ids=["png gray", "png rgba", "jpeg rgb", "jpeg gray", "png palette"],
)
def test_opened_images_announce_the_shape_their_decoding_gives(content, shape):
    pending = open_image_bytes(content, max_side=8)
    assert (pending.height, pending.width, pending.channels) == shape and pending.values == 5 * 7 * shape[2]
    assert pending.decode().shape == shape
    assert open_base64_image(base64.b64encode(content).decode(), max_side=8).values == pending.values


def test_a_jpeg_is_measured_from_its_header_and_refused_before_its_pixels_are_read(monkeypatch):
    content = encode(Image.fromarray(RNG.integers(0, 256, (40, 30, 3), dtype=np.uint8)), "JPEG")

    def no_decoding(self, *args, **kwargs):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(Image.Image, "load", no_decoding)
    monkeypatch.setattr("PIL.ImageFile.ImageFile.load", no_decoding)
    pending = open_image_bytes(content, max_side=64)
    assert (pending.height, pending.width, pending.channels) == (40, 30, 3)
    with pytest.raises(PayloadTooLarge, match="at most 32 pixels .* Received: 40×30"):
        open_image_bytes(content, max_side=32)


@pytest.mark.parametrize(
    ("pixels", "shape"),
    [([[0.5] * 7] * 5, (5, 7, 1)), ([[[0.5]] * 7] * 5, (5, 7, 1)), ([[[0.1, 0.2, 0.3]] * 7] * 5, (5, 7, 3)),
     ([[[0.1, 0.2, 0.3, 1.0]] * 7] * 5, (5, 7, 3))],
)
def test_nested_lists_are_measured_from_their_first_elements_without_converting(pixels, shape, monkeypatch):
    converted = []
    monkeypatch.setattr(np, "asarray", lambda *args, **kwargs: converted.append(1) or np.array(*args, **kwargs))
    pending = open_pixels(pixels, max_side=8)
    assert (pending.height, pending.width, pending.channels) == shape and not converted
    assert pending.decode().shape == shape and converted


def test_nested_lists_over_the_side_limit_are_refused_before_converting():
    with pytest.raises(PayloadTooLarge, match="at most 8 pixels"):
        open_pixels([[0.5] * 9] * 2, max_side=8)


@pytest.mark.parametrize("pixels", [[[0.1, 0.2], [0.3]], [[0.5], [0.5, 0.5]], [[0.1, [0.2]]]])
def test_a_ragged_list_whose_first_row_looks_small_still_fails_when_decoded(pixels):
    with pytest.raises(InvalidImage, match="ragged"):
        open_pixels(pixels, max_side=8).decode()


def test_raw_arrays_are_measured_from_their_shape_before_the_base64_is_decoded():
    pending = open_raw_array("not even base64", [6, 5, 7, 4], "uint8", max_side=8)
    assert (pending.count, pending.height, pending.width, pending.channels, pending.values) == (6, 5, 7, 3, 630)
    with pytest.raises(InvalidImage, match="not valid base64"):
        pending.decode()
    with pytest.raises(PayloadTooLarge, match="at most 8 pixels"):
        open_raw_array("", [2, 9, 1], "float32", max_side=8)
    with pytest.raises(InvalidImage, match="2 channels"):
        open_raw_array("", [2, 2, 2], "float32", max_side=8)


def test_a_raw_array_whose_sides_multiply_past_64_bits_is_a_clean_422():
    # 65536^4 * 4 bytes wraps an int64 to 0; an empty buffer must not pass for it.
    with pytest.raises(InvalidImage, match="does not match its shape"):
        decode_raw_array("", [65536] * 4, "float32", max_side=65536)
