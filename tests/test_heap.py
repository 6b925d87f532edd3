"""The agent hands freed heap back to the host (agent/heap.py): its RSS follows what it holds."""

from __future__ import annotations

import asyncio
import threading
import time

import psutil
import pytest

from agent.heap import HeapTrimmer, release_free_memory, trim_supported

pytestmark = pytest.mark.skipif(not trim_supported(), reason="malloc_trim is glibc's")


def _rss_mib() -> float:
    return psutil.Process().memory_info().rss / (1 << 20)


def _fragment_heap(kept: list[bytes]) -> None:
    """What adopting many domains does on a worker thread: many mid-sized allocations in that
    thread's arena, almost all freed, a few kept alive across it."""
    chunks = [bytes(20_000) for _ in range(5000)]  # 100 MB, each below glibc's mmap threshold
    kept.extend(chunks[::50])


def test_freed_heap_goes_back_to_the_host() -> None:
    kept: list[bytes] = []
    before = _rss_mib()
    worker = threading.Thread(target=_fragment_heap, args=(kept,))
    worker.start()
    worker.join()
    held = _rss_mib()
    assert held - before > 30, "glibc kept the freed chunks (what the agent trims)"
    release_free_memory()
    assert _rss_mib() < before + 10, f"RSS {before:.0f} → {held:.0f} → {_rss_mib():.0f} MiB after the trim"
    assert len(kept) == 100


async def test_the_trimmer_trims_soon_after_a_burst_and_then_periodically() -> None:
    trims: list[float] = []

    def release() -> bool:
        trims.append(time.monotonic())
        return release_free_memory()

    trimmer = HeapTrimmer(every=0.5, settle=0.1, release=release)
    task = asyncio.create_task(trimmer.run())
    try:
        await asyncio.sleep(0.05)
        assert trims == []  # no trim before its period
        started = time.monotonic()
        trimmer.soon()
        trimmer.soon()  # two in a row make one trim
        await asyncio.sleep(0.3)
        assert len(trims) == 1 and 0.1 <= trims[0] - started < 0.3
        await asyncio.sleep(0.6)
        assert len(trims) == 2  # then once a period
    finally:
        task.cancel()
