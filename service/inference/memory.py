"""The C allocator and large request buffers (glibc; no-ops on other C libraries).

glibc gives threads their own arenas and raises its mmap threshold each time a large block is freed (up to 32 MiB),
so a large request's buffers end up in a worker thread's arena, whose free top malloc_trim does not return: a
16 x 512² batch left ~60 MiB resident that way. With one arena for the process, release_free_memory returns all of
it (the gateway's threads take turns on the GIL anyway; figures in bench/README.md, 2026-12-03).
"""

from __future__ import annotations

import ctypes
import os

#: glibc's mallopt parameter number for the arena limit (M_ARENA_MAX in malloc.h).
_M_ARENA_MAX = -8

_LIBC = ctypes.CDLL(None) if os.name == "posix" else None
_MALLOPT = getattr(_LIBC, "mallopt", None)
_MALLOC_TRIM = getattr(_LIBC, "malloc_trim", None)


def use_one_malloc_arena() -> bool:
    """Make threads that have not allocated yet share the main arena; False where the C library has no mallopt.

    Call it before the worker threads start (the gateway's lifespan does)."""
    if _MALLOPT is None:
        return False
    return bool(_MALLOPT(_M_ARENA_MAX, 1))


def release_free_memory() -> None:
    """Give the C allocator's free pages back to the system (glibc's malloc_trim; a no-op elsewhere)."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)
