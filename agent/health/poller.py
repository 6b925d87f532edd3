"""The sockets and deadlines of every probe on one event loop, watched as a whole.

asyncio's own `add_writer`/`call_later` cost a selector key, a handle and a timer per probe,
plus their removal; at 500 probes a second that bookkeeping was a fifth of the probing CPU
(bench/README.md, `health`). Here every probe socket goes into one epoll set that the loop
watches as a single reader, and every deadline into one heap swept by one timer at most every
`granularity` seconds, so a timeout fires up to that late (50 ms against timeouts of seconds).

Closing a socket removes it from the epoll set (the kernel does it: we never duplicate
probe sockets), so a finished probe costs one dict removal.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import select
import weakref
from typing import Protocol

EPOLLIN, EPOLLOUT, EPOLLERR, EPOLLHUP = select.EPOLLIN, select.EPOLLOUT, select.EPOLLERR, select.EPOLLHUP


class Watched(Protocol):
    finished: bool

    def on_event(self, events: int) -> None: ...
    def on_timeout(self) -> None: ...


class Poller:
    def __init__(self, loop: asyncio.AbstractEventLoop, granularity: float = 0.05) -> None:
        self.loop = loop
        self.granularity = granularity
        self._epoll = select.epoll()
        self._watched: dict[int, Watched] = {}
        self._deadlines: list[tuple[float, int, Watched]] = []
        self._order = itertools.count()
        self._sweeper: asyncio.TimerHandle | None = None
        loop.add_reader(self._epoll.fileno(), self._ready)
        weakref.finalize(self, self._epoll.close)

    def watch(self, fd: int, events: int, watched: Watched, deadline: float) -> None:
        self._watched[fd] = watched
        self._epoll.register(fd, events)
        heapq.heappush(self._deadlines, (deadline, next(self._order), watched))
        if self._sweeper is None:
            self._arm(self.loop.time())

    def modify(self, fd: int, events: int) -> None:
        self._epoll.modify(fd, events)

    def forget(self, fd: int) -> None:
        """Before the socket is closed (which takes it out of the epoll set)."""
        del self._watched[fd]

    def _ready(self) -> None:
        watched = self._watched
        for fd, events in self._epoll.poll(0):
            target = watched.get(fd)
            if target is not None:
                target.on_event(events)

    def _arm(self, now: float) -> None:
        if self._deadlines:
            at = max(self._deadlines[0][0], now + self.granularity)
            self._sweeper = self.loop.call_at(at, self._sweep)

    def _sweep(self) -> None:
        self._sweeper = None
        now = self.loop.time()
        deadlines = self._deadlines
        while deadlines and deadlines[0][0] <= now:
            target = heapq.heappop(deadlines)[2]
            if not target.finished:
                target.on_timeout()
        self._arm(now)


_pollers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Poller] = weakref.WeakKeyDictionary()


def poller_of(loop: asyncio.AbstractEventLoop) -> Poller:
    """The loop's poller, made on first use."""
    poller = _pollers.get(loop)
    if poller is None:
        poller = _pollers[loop] = Poller(loop)
    return poller
