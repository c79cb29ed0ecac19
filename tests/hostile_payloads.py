"""Hostile payloads built by hand for the upload and image tests: zip directories with many members, a
decompression bomb, a PNG header that claims a huge image."""

from __future__ import annotations

import functools
import io
import struct
import zlib

import numpy as np


def empty_members_zip(count: int, suffix: str = ".png") -> bytes:
    """A zip of `count` empty stored members laid out as zipfile writes them (ZIP64 end records past 65,535
    entries); built with struct because zipfile itself takes ~5 s for 200k members."""
    local, central, offset = [], [], 0
    for index in range(count):
        name = f"{index:06d}{suffix}".encode()
        header = struct.pack("<4s5H3L2H", b"PK\x03\x04", 20, 0, 0, 0, 0x21, 0, 0, 0, len(name), 0) + name
        central.append(
            struct.pack("<4s6H3L5H2L", b"PK\x01\x02", 20, 20, 0, 0, 0, 0x21, 0, 0, 0, len(name), 0, 0, 0, 0, 0, offset)
            + name
        )
        local.append(header)
        offset += len(header)
    directory = b"".join(central)
    tail = b""
    if count > 0xFFFF:
        zip64_at = offset + len(directory)
        tail = struct.pack("<4sQ2H2L4Q", b"PK\x06\x06", 44, 45, 45, 0, 0, count, count, len(directory), offset)
        tail += struct.pack("<4sLQL", b"PK\x06\x07", 0, zip64_at, 1)
    entries = min(count, 0xFFFF)
    tail += struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, entries, entries, len(directory), offset, 0)
    return b"".join(local) + directory + tail


@functools.cache
def npz_bomb() -> bytes:
    """The issue's upload: 255 KiB of compressed .npz that decodes to 256 MiB (1024 x 256 x 256 float32 zeros)."""
    buffer = io.BytesIO()
    np.savez_compressed(buffer, x=np.zeros((1024, 256, 256), np.float32))
    return buffer.getvalue()


def png_with_header(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims `width` x `height` (8-bit gray) with no pixel data behind it."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">2I5B", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
