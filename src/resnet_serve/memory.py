"""Giving free heap back to the operating system (glibc's ``malloc_trim``), every few seconds.

After a large transient buffer is freed (a 10 MB upload that was refused, say), glibc raises its
mmap threshold and later large buffers come from the heap, whose high-water mark then stays
resident: RSS creeps up by the peak of concurrent large uploads. Trimming returns it. (Pinning
the mmap threshold instead cost about a fifth of the throughput: the runtime's multi-MB
activations would then be mapped and unmapped on every forward pass.)
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
from collections.abc import Callable

TRIM_INTERVAL_S = 5.0


def _load_malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None where the C library has none (musl, macOS)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim  # type: ignore[no-any-return]
    except (OSError, AttributeError):
        return None


_malloc_trim = _load_malloc_trim()


def release_free_heap() -> bool:
    """Give free heap pages back to the OS; False where the C library cannot."""
    if _malloc_trim is None:
        return False
    _malloc_trim(0)
    return True


async def _trim_forever(interval_s: float) -> None:
    while True:
        await asyncio.sleep(interval_s)
        await asyncio.to_thread(release_free_heap)


def start_heap_trimmer(interval_s: float = TRIM_INTERVAL_S) -> asyncio.Task[None] | None:
    """A background task on the running loop that trims every ``interval_s`` (None: no glibc)."""
    if _malloc_trim is None:
        return None
    return asyncio.get_running_loop().create_task(_trim_forever(interval_s), name="resnet-serve-heap-trim")
