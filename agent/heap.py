"""Hand freed heap memory back to the host, so the agent's RSS follows what it holds.

Adopting 1,000 domains, or answering a burst of events, parses many XML documents on the
libvirt worker threads (and libvirt's test driver, in-process, parses its whole node file). The
memory is freed afterwards, but glibc keeps it inside its arenas (one per thread, fragmented):
an agent that holds ~130 MiB was measured at ~215 MiB for as long as it ran (`python -m bench
scale`). glibc's `malloc_trim(0)` releases the free pages of every arena; it takes ~13 ms the
first time and ~1 ms after that, so the agent calls it on a worker thread 5 s after each
adoption of libvirt's domains and every 15 s (under 0.01 % of a core). On a C library without
`malloc_trim` (musl), nothing is done.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
from collections.abc import Callable

log = logging.getLogger("herdsman.heap")

TRIM_EVERY = 15.0
#: How long after an adoption to trim: its follow-ups (restart policy, health checks, published
#: ports) read every VM again in the background first.
SETTLE = 5.0


def _find_malloc_trim() -> Callable[[int], int] | None:
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


_MALLOC_TRIM = _find_malloc_trim()


def trim_supported() -> bool:
    return _MALLOC_TRIM is not None


def release_free_memory() -> bool:
    """Return the C heap's free pages to the host; True when glibc released any."""
    return bool(_MALLOC_TRIM(0)) if _MALLOC_TRIM is not None else False


class HeapTrimmer:
    """Trims every `every` seconds, and soon after a burst the agent knows of (an adoption)."""

    def __init__(self, every: float = TRIM_EVERY, settle: float = SETTLE,
                 release: Callable[[], bool] = release_free_memory) -> None:
        self.every, self.settle, self._release = every, settle, release
        self._wake = asyncio.Event()

    def soon(self) -> None:
        """Trim `settle` seconds from now (several calls in a row make one trim)."""
        self._wake.set()

    async def run(self) -> None:
        """Until cancelled."""
        if _MALLOC_TRIM is None:
            log.debug("malloc_trim is not available: freed heap stays with the process")
            return
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), self.every)
                await asyncio.sleep(self.settle)
            except TimeoutError:
                pass
            self._wake.clear()
            await asyncio.to_thread(self._release)
