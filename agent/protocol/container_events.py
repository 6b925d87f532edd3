"""Host-side state changes to the controller's `/containerevents`, in order for each VM.

A post may be retried (connect errors, 5xx), so two posts sent side by side can arrive
swapped: a policy restart's `die` retried after its `start` would leave the controller thinking
the VM is stopped until the next ping. So a VM's post waits for the one before it. VMs do not
wait for each other: a controller that is away costs each VM its own retries, not a queue.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

Post = Callable[[dict[str, Any]], Awaitable[None]]


class ContainerEventSender:
    def __init__(self, post: Post, logger: logging.Logger) -> None:
        self._post = post
        self._log = logger
        self._last: dict[str, asyncio.Task[None]] = {}  # each VM's newest post
        self._tasks: set[asyncio.Task[None]] = set()

    def send(self, body: dict[str, Any]) -> None:
        """Post `body` after every earlier post for the same VM (`externalId`) has ended."""
        key = str(body.get("externalId"))
        task = asyncio.ensure_future(self._post_after(self._last.get(key), body))
        self._last[key] = task
        self._tasks.add(task)
        task.add_done_callback(lambda done: self._forget(key, done))

    def _forget(self, key: str, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if self._last.get(key) is task:
            del self._last[key]

    async def _post_after(self, previous: asyncio.Task[None] | None, body: dict[str, Any]) -> None:
        if previous is not None:  # however it ended; a cancel of this post still cancels it
            await asyncio.wait([previous])
        try:
            await self._post(body)
        except Exception as exc:  # noqa: BLE001 - the next ping carries the state anyway
            self._log.warning("could not report host event", extra={"error": str(exc), **body})

    async def close(self) -> None:
        """Drop posts not yet made (the next agent's pings report the states)."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
