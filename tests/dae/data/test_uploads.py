"""Uploaded datasets: .npz and zips of PNGs, their validation, and caps checked before anything is decoded."""

from __future__ import annotations

import io
import struct
import time
import tracemalloc
import zipfile

import numpy as np
import pytest
from PIL import Image

from dae import data
from dae.data import png_zip
from dae.errors import InvalidDataset, PayloadTooLarge
from tests.hostile_payloads import empty_members_zip, npz_bomb, png_with_header

# ---------------------------------------------------------------------------------------------
# Uploads: .npz
# ---------------------------------------------------------------------------------------------


def npz_bytes(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def test_npz_uint8_is_scaled_and_gets_a_channel_axis() -> None:
    pixels = np.array([[[0, 255], [51, 102]], [[1, 2], [3, 4]], [[5, 6], [7, 8]]], dtype=np.uint8)
    pixels = np.tile(pixels, (1, 2, 2))  # 4x4 images
    images = data.parse_uploaded_dataset("faces.NPZ", npz_bytes(x=pixels))
    assert images.shape == (3, 4, 4, 1) and images.dtype == np.float32
    assert images[0, 0, 1, 0] == 1.0 and images[0, 1, 0, 0] == pytest.approx(0.2)


def test_npz_key_choice() -> None:
    rgb = np.random.default_rng(0).random((4, 5, 5, 3)).astype(np.float64)
    np.testing.assert_allclose(data.parse_uploaded_dataset("a.npz", npz_bytes(images=rgb)), rgb, rtol=1e-6)
    chosen = data.parse_uploaded_dataset("a.npz", npz_bytes(labels=np.zeros(4), x=rgb))
    assert chosen.shape == (4, 5, 5, 3)
    with pytest.raises(InvalidDataset, match=r"key 'x' or exactly one array. Received: keys=\['a', 'b'\]"):
        data.parse_uploaded_dataset("a.npz", npz_bytes(a=rgb, b=rgb))


def test_npz_pickled_object_arrays_are_refused() -> None:
    objects = np.empty((2, 4, 4), dtype=object)
    objects[...] = 0
    buffer = io.BytesIO()
    np.savez(buffer, x=objects)  # stored with a pickle inside
    with pytest.raises(InvalidDataset, match="Pickled object arrays are refused"):
        data.parse_uploaded_dataset("evil.npz", buffer.getvalue())


@pytest.mark.parametrize(
    ("array", "error", "message"),
    [
        (np.full((3, 4, 4), np.nan, dtype=np.float32), InvalidDataset, "finite"),
        (np.full((3, 4, 4), np.inf, dtype=np.float32), InvalidDataset, "finite"),
        (np.full((3, 4, 4), 1.5, dtype=np.float32), InvalidDataset, r"\[0, 1\].*max=1.5"),
        (np.full((3, 4, 4), -0.1, dtype=np.float32), InvalidDataset, "min=-0.1"),
        (np.zeros((3, 16), dtype=np.uint8), InvalidDataset, r"Expected \(N, H, W\).*shape=\(3, 16\)"),
        (np.zeros((3, 4, 4, 2), dtype=np.uint8), InvalidDataset, r"C in \{1, 3\}.*shape=\(3, 4, 4, 2\)"),
        (np.zeros((3, 4, 4, 1, 1), dtype=np.uint8), InvalidDataset, "Expected"),
        (np.zeros((3, 4, 4), dtype=np.int64), InvalidDataset, r"dtype=int64.*astype\(np.uint8\)"),
        (np.zeros((3, 4, 4), dtype=np.complex64), InvalidDataset, "dtype=complex64"),
        (np.zeros((1, 4, 4), dtype=np.uint8), InvalidDataset, "at least 2 images"),
        (np.zeros((3, 2, 4), dtype=np.uint8), InvalidDataset, "too small"),
        (np.zeros((3, 600, 4), dtype=np.uint8), PayloadTooLarge, "height and width <= 512. Received: 600x4"),
    ],
)
def test_npz_validation_errors(array: np.ndarray, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        data.parse_uploaded_dataset("bad.npz", npz_bytes(x=array))


def test_npz_limits_are_checked_from_the_header() -> None:
    content = npz_bytes(x=np.zeros((10, 8, 8), dtype=np.uint8))
    with pytest.raises(PayloadTooLarge, match="at most 5. Received: 10"):
        data.parse_uploaded_dataset("many.npz", content, max_images=5)
    # The decoded size is counted as float32, what the parser returns and training loads: 10*8*8*1*4 bytes.
    assert data.parse_uploaded_dataset("many.npz", content, max_bytes=2560).shape == (10, 8, 8, 1)
    with pytest.raises(PayloadTooLarge, match=r"take 2,560 bytes .*Expected at most 2,559 bytes .*DAE_MAX_DATASET_MB"):
        data.parse_uploaded_dataset("many.npz", content, max_bytes=2559)


@pytest.mark.parametrize(
    ("filename", "content", "message"),
    [
        ("data.npz", b"not a zip at all", "Expected a valid npz"),
        ("data.zip", b"PK\x03\x04 truncated", "Expected a valid zip"),
        ("data.csv", b"1,2,3", r"Expected a .npz file or a .zip of PNG images. Received: filename='data.csv'"),
        ("data.npz", b"", "empty"),
    ],
)
def test_unreadable_uploads(filename: str, content: bytes, message: str) -> None:
    with pytest.raises(InvalidDataset, match=message):
        data.parse_uploaded_dataset(filename, content)


# ---------------------------------------------------------------------------------------------
# Uploads: .zip of PNGs
# ---------------------------------------------------------------------------------------------


def png_bytes(array: np.ndarray, mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buffer, format="PNG")
    return buffer.getvalue()


def zip_bytes(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, content in files.items():
            archive.writestr(name, content)
    return buffer.getvalue()


def test_zip_of_grayscale_pngs() -> None:
    first = np.zeros((6, 7), dtype=np.uint8)
    first[0, 0] = 255
    second = np.full((6, 7), 51, dtype=np.uint8)
    content = zip_bytes(
        {"b.png": png_bytes(second), "a.png": png_bytes(first), "__MACOSX/._a.png": b"junk", "dir/": b""}
    )
    images = data.parse_uploaded_dataset("set.zip", content)
    assert images.shape == (2, 6, 7, 1) and images.dtype == np.float32
    assert images[0, 0, 0, 0] == 1.0 and images[0, 1, 1, 0] == 0.0  # sorted by name: a.png first
    assert images[1, 3, 3, 0] == pytest.approx(0.2)


def test_zip_of_mixed_gray_and_rgb_becomes_rgb_and_16_bit_is_scaled() -> None:
    rgb = np.zeros((5, 5, 3), dtype=np.uint8)
    rgb[..., 0] = 255
    gray = np.full((5, 5), 102, dtype=np.uint8)
    images = data.parse_uploaded_dataset("m.zip", zip_bytes({"1.png": png_bytes(rgb), "2.png": png_bytes(gray)}))
    assert images.shape == (2, 5, 5, 3)
    np.testing.assert_allclose(images[0, 0, 0], [1.0, 0.0, 0.0])
    np.testing.assert_allclose(images[1, 0, 0], [0.4, 0.4, 0.4], rtol=1e-6)

    deep = np.full((5, 5), 65535, dtype=np.uint16)
    deep[0, 0] = 0
    images16 = data.parse_uploaded_dataset("d.zip", zip_bytes({"1.png": png_bytes(deep), "2.png": png_bytes(deep)}))
    assert images16.shape == (2, 5, 5, 1)
    assert images16[0, 0, 0, 0] == 0.0 and images16[0, 1, 1, 0] == 1.0


def test_zip_validation_errors() -> None:
    square = png_bytes(np.zeros((5, 5), dtype=np.uint8))
    wide = png_bytes(np.zeros((5, 8), dtype=np.uint8))
    with pytest.raises(InvalidDataset, match=r"same size. Expected 5x5 .*'a.png'.*Received: 5x8 in 'b.png'"):
        data.parse_uploaded_dataset("z.zip", zip_bytes({"a.png": square, "b.png": wide}))
    with pytest.raises(InvalidDataset, match=r"only.*Received: other files \['notes.txt'\]"):
        data.parse_uploaded_dataset("z.zip", zip_bytes({"a.png": square, "notes.txt": b"hi"}))
    with pytest.raises(InvalidDataset, match="decodable PNG"):
        data.parse_uploaded_dataset("z.zip", zip_bytes({"a.png": square, "b.png": b"not a png"}))
    jpeg = io.BytesIO()
    Image.fromarray(np.zeros((5, 5), dtype=np.uint8)).save(jpeg, format="JPEG")
    with pytest.raises(InvalidDataset, match="Expected PNG images. Received: 'b.png' is JPEG"):
        data.parse_uploaded_dataset("z.zip", zip_bytes({"a.png": square, "b.png": jpeg.getvalue()}))
    with pytest.raises(InvalidDataset, match="at least one .png"):
        data.parse_uploaded_dataset("z.zip", zip_bytes({"__MACOSX/x": b""}))
    with pytest.raises(PayloadTooLarge, match="at most 2. Received: 3"):
        data.parse_uploaded_dataset("z.zip", zip_bytes({f"{i}.png": square for i in range(3)}), max_images=2)
    with pytest.raises(PayloadTooLarge, match="height and width <= 4"):
        data.parse_uploaded_dataset("z.zip", zip_bytes({"a.png": square, "b.png": square}), max_side=4)


def test_zip_bomb_is_refused_before_decompressing() -> None:
    # 64 MiB of zeros deflate to ~64 KiB; the declared size gives it away before any byte is inflated.
    bomb = zip_bytes({"a.png": png_bytes(np.zeros((5, 5), dtype=np.uint8)), "bomb.png": bytes(64 * 1024 * 1024)})
    assert len(bomb) < 200_000
    with pytest.raises(PayloadTooLarge, match="bomb.png' is too large"):
        data.parse_uploaded_dataset("bomb.zip", bomb, max_side=64)


# ---------------------------------------------------------------------------------------------
# Uploads: caps checked from headers and the zip directory, bombs
# ---------------------------------------------------------------------------------------------


def test_the_zip_builder_writes_what_zipfile_reads() -> None:
    for count in (3, 0x10000 + 5):  # plain and ZIP64 end records
        names = zipfile.ZipFile(io.BytesIO(empty_members_zip(count))).namelist()
        assert len(names) == count and names[-1] == f"{count - 1:06d}.png"


@pytest.mark.parametrize(("filename", "suffix"), [("bomb.zip", ".png"), ("bomb.npz", ".npy")])
def test_200k_empty_members_are_refused_from_the_eocd_before_zipfile_lists_them(
    filename: str, suffix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    bomb = empty_members_zip(200_000, suffix)
    listed = []
    monkeypatch.setattr(zipfile, "ZipFile", lambda *args, **_kwargs: listed.append(args))
    started = time.perf_counter()
    with pytest.raises(PayloadTooLarge, match=r"Too many entries in 'bomb.*Received: 200,000 entries") as refused:
        data.parse_uploaded_dataset(filename, bomb)
    elapsed = time.perf_counter() - started
    print(f"{filename}: {len(bomb):,} bytes, 200,000 members refused in {elapsed * 1000:.1f} ms")
    assert listed == [] and elapsed < 0.5  # zipfile needs ~2 s and ~117 MiB just to list them
    assert ("DAE_MAX_DATASET_IMAGES" in str(refused.value)) == (suffix == ".png")


def test_the_entry_limit_boundary_counts_skipped_entries_too() -> None:
    square = png_bytes(np.zeros((4, 4), dtype=np.uint8))
    limit = 3 + data.ZIP_ENTRY_ALLOWANCE
    files = {f"{index}.png": square for index in range(3)} | {f"dir{index}/": b"" for index in range(limit - 3)}
    at_limit = zip_bytes(files)
    assert data.parse_uploaded_dataset("z.zip", at_limit, max_images=3).shape == (3, 4, 4, 1)
    over = zip_bytes(files | {"__MACOSX/._0.png": b""})
    with pytest.raises(PayloadTooLarge, match=f"Received: {limit + 1:,} entries"):
        data.parse_uploaded_dataset("z.zip", over, max_images=3)
    arrays = {f"a{index}": np.zeros(1) for index in range(data.NPZ_MAX_MEMBERS)}
    pixels = np.zeros((2, 4, 4), np.uint8)
    with pytest.raises(PayloadTooLarge, match=r"at most 64 arrays. Received: 65 entries"):
        data.parse_uploaded_dataset("n.npz", npz_bytes(x=pixels, **arrays))
    arrays.pop("a0")
    assert data.parse_uploaded_dataset("n.npz", npz_bytes(x=pixels, **arrays)).shape == (2, 4, 4, 1)


def test_a_zip_whose_end_record_lies_about_its_count_or_has_a_comment_is_still_counted() -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for index in range(50):
            archive.writestr(f"{index}.png", b"")
        archive.comment = b"made by a test: the end record is no longer the last 22 bytes"
    commented = buffer.getvalue()
    with pytest.raises(PayloadTooLarge, match="Received: 50 entries"):
        data.check_zip_entries(commented, "c.zip", 49, "at most 49")
    data.check_zip_entries(commented, "c.zip", 50, "at most 50")

    lying = bytearray(empty_members_zip(50))
    struct.pack_into("<2H", lying, len(lying) - 14, 1, 1)  # the EOCD's two entry counts say 1
    assert len(zipfile.ZipFile(io.BytesIO(bytes(lying))).infolist()) == 50  # zipfile reads by directory size
    with pytest.raises(PayloadTooLarge, match="Received: 50 entries"):
        data.check_zip_entries(bytes(lying), "l.zip", 49, "at most 49")


def test_the_npz_bomb_is_refused_from_its_header_without_allocating() -> None:
    bomb = npz_bomb()
    assert len(bomb) < 300_000
    tracemalloc.start()
    started = time.perf_counter()
    try:
        with pytest.raises(PayloadTooLarge, match=r"1024 images of 256x256x1 as float32 take 268,435,456 bytes"):
            data.parse_uploaded_dataset("bomb.npz", bomb, max_side=256, max_bytes=64 * 2**20)
        elapsed = time.perf_counter() - started
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    print(f"npz bomb: {len(bomb):,} bytes -> 256 MiB decoded, refused in {elapsed * 1000:.1f} ms, peak {peak:,} B")
    assert elapsed < 0.5 and peak < 2**20


def test_the_decoded_size_boundary_of_an_npz_counts_float32_whatever_the_source_dtype() -> None:
    for dtype in (np.uint8, np.float16, np.float64):
        content = npz_bytes(x=np.zeros((6, 8, 8, 3), dtype))
        exact = 6 * 8 * 8 * 3 * 4
        assert data.parse_uploaded_dataset("a.npz", content, max_bytes=exact).shape == (6, 8, 8, 3)
        with pytest.raises(PayloadTooLarge, match=f"take {exact:,} bytes"):
            data.parse_uploaded_dataset("a.npz", content, max_bytes=exact - 1)


def test_npz_arrays_in_any_byte_order_and_memory_order_read_exactly() -> None:
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (5, 6, 7, 3), dtype=np.uint8)
    floats = rng.random((5, 6, 7), dtype=np.float64)
    cases = [
        (pixels, pixels.astype(np.float32) / np.float32(255.0)),
        (np.asfortranarray(pixels), pixels.astype(np.float32) / np.float32(255.0)),
        (floats.astype(">f4"), floats.astype(np.float32)[..., np.newaxis]),
        (np.asfortranarray(floats), floats.astype(np.float32)[..., np.newaxis]),
    ]
    for source, expected in cases:
        images = data.parse_uploaded_dataset("a.npz", npz_bytes(x=source))
        assert images.dtype == np.float32 and images.flags.c_contiguous
        np.testing.assert_array_equal(images, expected)


def test_a_truncated_npz_member_is_422() -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive, archive.open("x.npy", "w") as member:
        np.lib.format.write_array_header_1_0(member, {"descr": "|u1", "fortran_order": False, "shape": (4, 8, 8)})
        member.write(bytes(100))  # 256 bytes announced
    with pytest.raises(InvalidDataset, match=r"truncated. Expected 256 bytes of data. Received: 100"):
        data.parse_uploaded_dataset("t.npz", buffer.getvalue())


def test_png_zip_sizes_come_from_the_headers_before_any_pixel_is_decoded(monkeypatch: pytest.MonkeyPatch) -> None:
    gray = png_bytes(np.zeros((8, 8), dtype=np.uint8))
    rgb = png_bytes(np.zeros((8, 8, 3), dtype=np.uint8))
    grays = zip_bytes({f"{index}.png": gray for index in range(4)})
    mixed = zip_bytes({"0.png": gray, "1.png": rgb})
    assert data.parse_uploaded_dataset("g.zip", grays, max_bytes=4 * 64 * 4).shape == (4, 8, 8, 1)
    assert data.parse_uploaded_dataset("m.zip", mixed, max_bytes=2 * 64 * 3 * 4).shape == (2, 8, 8, 3)
    monkeypatch.setattr(png_zip, "png_pixels", lambda _image: pytest.fail("decoded a PNG of a refused upload"))
    with pytest.raises(PayloadTooLarge, match=r"4 images of 8x8x1 as float32 take 1,024 bytes"):
        data.parse_uploaded_dataset("g.zip", grays, max_bytes=4 * 64 * 4 - 1)
    with pytest.raises(PayloadTooLarge, match=r"2 images of 8x8x3 as float32 take 1,536 bytes"):
        data.parse_uploaded_dataset("m.zip", mixed, max_bytes=2 * 64 * 3 * 4 - 1)


def test_a_zip_of_large_black_pngs_is_refused_from_the_headers_quickly() -> None:
    black = png_bytes(np.zeros((2048, 2048), dtype=np.uint8))  # ~4 KiB, 16 MiB once decoded to float32
    bomb = zip_bytes({f"{index:03d}.png": black for index in range(64)})
    started = time.perf_counter()
    with pytest.raises(PayloadTooLarge, match=r"64 images of 2048x2048x1 as float32 take 1,073,741,824 bytes"):
        data.parse_uploaded_dataset("black.zip", bomb, max_side=2048)
    elapsed = time.perf_counter() - started
    print(f"PNG zip bomb: {len(bomb):,} bytes -> 1 GiB decoded, refused in {elapsed * 1000:.1f} ms")
    assert elapsed < 0.5


def test_pillows_decompression_bomb_guard_is_a_413() -> None:
    huge = png_with_header(20_000, 20_000)  # 400 M pixels: past twice Image.MAX_IMAGE_PIXELS
    with pytest.raises(PayloadTooLarge, match=r"'b.png' is larger than Pillow's decompression-bomb guard"):
        data.parse_uploaded_dataset("z.zip", zip_bytes({"a.png": png_with_header(8, 8), "b.png": huge}))
    with pytest.raises(PayloadTooLarge, match=r"height and width <= 512. Received: 600x600"):
        data.parse_uploaded_dataset(
            "z.zip", zip_bytes({"a.png": png_with_header(600, 600)} | {"b.png": png_with_header(600, 600)})
        )


def test_declared_member_sizes_past_what_the_limits_allow_are_refused_before_inflating() -> None:
    square = png_bytes(np.zeros((8, 8), dtype=np.uint8))
    padded = square + bytes(2 * 2**20)  # a PNG with 2 MiB of trailing zeros: deflates to a few KiB
    content = zip_bytes({f"{index}.png": padded for index in range(3)})
    assert len(content) < 50_000
    with pytest.raises(PayloadTooLarge, match=r"zip would expand to 6,291,\d+ bytes. Expected at most 2,293,760 bytes"):
        data.parse_uploaded_dataset("r.zip", content, max_side=512, max_bytes=2**20)
