"""A per-host cap on concurrent outgoing migrations, queueing the rest in arrival order.

Parallel migrations share the host's link and each one's downtime grows (xen-orchestra #6065);
KubeVirt/HCO and Nova run one at a time per host by default, so our default is 1. A request
over the cap waits its turn (FIFO, so a drain finishes in the order it was asked for) and can
learn its place in the queue for progress replies. One VM holds at most one place: a second
request for a VM already migrating or queued is refused, not queued twice.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable


class AlreadyMigrating(RuntimeError):
    """This VM already has a migration running or queued on this host."""


class MigrationSlots:
    def __init__(self, limit: int = 1) -> None:
        if limit < 1:
            raise ValueError("the migration limit must be at least 1")
        self._limit = limit
        self._running: set[str] = set()
        self._queue: deque[tuple[str, asyncio.Future[None]]] = deque()
        self._moved: dict[str, asyncio.Event] = {}

    @property
    def limit(self) -> int:
        return self._limit

    @property
    def running(self) -> frozenset[str]:
        return frozenset(self._running)

    @property
    def queued(self) -> tuple[str, ...]:
        return tuple(key for key, _ in self._queue)

    def set_limit(self, limit: int) -> None:
        """Change the cap; a higher one lets queued requests start at once."""
        if limit < 1:
            raise ValueError("the migration limit must be at least 1")
        self._limit = limit
        self._wake()

    @contextlib.asynccontextmanager
    async def slot(self, key: str, on_queued: Callable[[int], Awaitable[None] | None] | None = None
                   ) -> AsyncIterator[None]:
        """Hold one of the slots while the block runs (`key`: the VM's uuid).

        `on_queued(n)` is called while waiting, with the number of requests ahead (0 = next).
        """
        if key in self._running or any(k == key for k, _ in self._queue):
            raise AlreadyMigrating(f"{key} is already migrating or waiting to migrate")
        if len(self._running) < self._limit and not self._queue:
            self._running.add(key)
        else:
            await self._wait(key, on_queued)
        try:
            yield
        finally:
            self._running.discard(key)
            self._wake()

    async def _wait(self, key: str, on_queued: Callable[[int], Awaitable[None] | None] | None) -> None:
        loop = asyncio.get_running_loop()
        turn: asyncio.Future[None] = loop.create_future()
        moved = asyncio.Event()  # set whenever the queue ahead of us changes
        self._queue.append((key, turn))
        self._moved[key] = moved
        try:
            last = None
            while not turn.done():
                position = self._position(key)
                if on_queued is not None and position != last:
                    last = position
                    result = on_queued(position)
                    if result is not None:
                        await result
                    continue  # the queue may have moved while we reported
                moved.clear()
                waiter = asyncio.ensure_future(moved.wait())
                try:
                    await asyncio.wait([turn, waiter], return_when=asyncio.FIRST_COMPLETED)
                finally:
                    waiter.cancel()
        except BaseException:
            if turn.done() and key in self._running:
                self._running.discard(key)  # our turn came as we were cancelled: pass it on
            else:
                self._queue = deque(item for item in self._queue if item[0] != key)
            self._wake()
            raise
        finally:
            self._moved.pop(key, None)

    def _position(self, key: str) -> int:
        return next(i for i, (k, _) in enumerate(self._queue) if k == key)

    def _wake(self) -> None:
        while self._queue and len(self._running) < self._limit:
            key, turn = self._queue.popleft()
            if turn.done():
                continue
            self._running.add(key)
            turn.set_result(None)
        for event in self._moved.values():
            event.set()
