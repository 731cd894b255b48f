"""release_freed_memory gives a fragmented heap's free pages back to the OS (glibc), as extract relies on."""

from __future__ import annotations

import psutil
import pytest

from transferlab import memory

BLOCK = 100_000  # bytes: below glibc's initial mmap threshold (128 KiB), so the blocks live on the heap
BLOCKS = 2000  # ~200 MB


@pytest.mark.skipif(memory._malloc_trim() is None, reason="the C library has no malloc_trim (not glibc)")
def test_freed_heap_pages_return_to_the_os() -> None:
    me = psutil.Process()
    blocks = [bytearray(BLOCK) for _ in range(BLOCKS)]
    pin = bytearray(BLOCK)  # a live block above the freed ones: free() alone cannot shrink the heap's top
    del blocks
    before = me.memory_info().rss
    assert memory.release_freed_memory()
    released = before - me.memory_info().rss
    assert released > BLOCK * BLOCKS // 2, f"only {released / 2**20:.0f} MB returned"
    del pin
