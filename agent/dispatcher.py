"""From websocket frames to handler runs and replies.

Rules (cattle-protocol.md §1.4, §2): keepalive pings without replyTo are ignored; events on the
same resource never run at the same time (except routes marked `serial=False`: a migration and
its cancel); a copy of an event that is still running (same
resource, name and data) is answered with the first run's outcome instead of running again;
an event id seen in the last minute (Cattle re-publishes the same id on retry) gets the same
reply again; heavy operations share a bounded pool; every failure becomes an error reply and
the agent carries on.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from agent.protocol.events import Event, FrameError, make_error_reply, make_reply, parse_frame

Handler = Callable[[Event], Awaitable[dict[str, Any] | None]]
Publish = Callable[[dict[str, Any]], Awaitable[None]]
#: (event name, "ok" or "error", seconds from arrival to outcome), e.g. for metrics
OutcomeObserver = Callable[[str, str, float], None]

DEFAULT_MAX_EVENT_BYTES = 4 << 20
RECENT_OUTCOMES = 1024
RECENT_SECONDS = 60.0


class HandlerError(Exception):
    """A handler's refusal; the message goes to the controller's user as is."""


@dataclass(frozen=True)
class Route:
    handler: Handler
    heavy: bool = False
    #: False: not queued behind other events on the same resource (a cancel must reach what it
    #: cancels; a migration lasts minutes and serialises itself in the driver)
    serial: bool = True


@dataclass(frozen=True)
class Outcome:
    data: dict[str, Any] | None = None
    error: str | None = None
    internal: str | None = None
    finished: float = 0.0


def _fingerprint(event: Event) -> tuple[str, str, str]:
    body = json.dumps(event.data, sort_keys=True, default=str).encode()
    return (event.resource_key or f"event:{event.id}", event.base_name, hashlib.sha256(body).hexdigest())


class Dispatcher:
    def __init__(self, routes: dict[str, Route], publish: Publish, *, concurrency: int = 8,
                 max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES, logger: logging.Logger | None = None,
                 on_outcome: OutcomeObserver | None = None) -> None:
        self.routes = routes
        self.on_outcome = on_outcome
        self._publish = publish
        self._heavy = asyncio.Semaphore(concurrency)
        self._max_bytes = max_event_bytes
        self._log = logger or logging.getLogger("herdsman.dispatch")
        self._locks: dict[str, asyncio.Lock] = {}
        self._running: dict[tuple[str, str, str], asyncio.Future[Outcome]] = {}
        self._recent: OrderedDict[str, Outcome] = OrderedDict()
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def event_names(self) -> list[str]:
        return sorted(self.routes)

    async def on_frame(self, text: str | bytes) -> None:
        """Parse and schedule; returns at once so the websocket reader never stalls."""
        try:
            event = parse_frame(text, max_bytes=self._max_bytes)
        except FrameError as exc:
            self._log.warning("bad event frame", extra={"error": str(exc), "replyTo": exc.reply_to})
            request = exc.as_request()
            if request is not None:
                self._spawn(self._publish_safely(make_error_reply(request, f"bad event: {exc}")))
            return
        if event.base_name == "ping" and not event.replyTo:
            return  # the controller's keepalive
        self._spawn(self.handle(event))

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def drain(self) -> None:
        """Wait for every event in flight (used at shutdown and by tests)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def handle(self, event: Event) -> None:
        route = self.routes.get(event.base_name)
        if route is None:
            if event.replyTo:
                await self._publish_safely(make_error_reply(event, f"unknown event {event.base_name!r}"))
            return
        started = time.monotonic()
        outcome = await self._run_once(event, route)
        if self.on_outcome is not None:
            self.on_outcome(event.base_name, "ok" if outcome.error is None else "error", time.monotonic() - started)
        if not event.replyTo:
            return
        if outcome.error is not None:
            reply = make_error_reply(event, outcome.error, outcome.internal)
        else:
            reply = make_reply(event, outcome.data)
        await self._publish_safely(reply)

    async def _run_once(self, event: Event, route: Route) -> Outcome:
        key = _fingerprint(event)
        self._forget_old()
        if event.id and event.id in self._recent:
            return self._recent[event.id]
        running = self._running.get(key)
        if running is not None:
            self._log.info("duplicate event joins the running one", extra={"event": event.base_name, "id": event.id})
            return await asyncio.shield(running)
        future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        self._running[key] = future
        try:
            if route.serial:
                outcome = await self._run_serialised(event, route, key[0])
            else:
                outcome = await self._invoke(event, route)
        finally:
            self._running.pop(key, None)
        future.set_result(outcome)
        if event.id and outcome.error is None:
            self._recent[event.id] = outcome
        return outcome

    async def _run_serialised(self, event: Event, route: Route, resource: str) -> Outcome:
        lock = self._locks.setdefault(resource, asyncio.Lock())
        try:
            async with lock:
                heavy = self._heavy if route.heavy else contextlib.nullcontext()
                async with heavy:
                    return await self._invoke(event, route)
        finally:
            if not lock.locked() and self._locks.get(resource) is lock:
                del self._locks[resource]

    async def _invoke(self, event: Event, route: Route) -> Outcome:
        started = time.monotonic()
        try:
            data = await route.handler(event)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # every failure becomes a reply; the agent goes on
            message = str(exc) or type(exc).__name__
            expected = isinstance(exc, HandlerError) or type(exc).__module__.startswith(("agent.", "drivers."))
            if expected:
                self._log.warning("event failed", extra={"event": event.base_name, "id": event.id, "error": message})
                return Outcome(error=message, internal=f"{type(exc).__name__}: {message}", finished=time.monotonic())
            self._log.exception("event handler crashed", extra={"event": event.base_name, "id": event.id})
            return Outcome(error=f"internal error: {type(exc).__name__}: {message}",
                           internal=f"{type(exc).__name__}: {message}", finished=time.monotonic())
        self._log.info("event handled", extra={"event": event.base_name, "id": event.id,
                                               "resource": event.resource_key,
                                               "ms": round((time.monotonic() - started) * 1000, 1)})
        return Outcome(data=data, finished=time.monotonic())

    def _forget_old(self) -> None:
        cutoff = time.monotonic() - RECENT_SECONDS
        while self._recent and (len(self._recent) > RECENT_OUTCOMES or next(iter(self._recent.values())).finished < cutoff):
            self._recent.popitem(last=False)

    async def _publish_safely(self, reply: dict[str, Any]) -> None:
        try:
            await self._publish(reply)
        except Exception as exc:  # the controller retries on its side; never crash on a reply
            self._log.warning("could not publish reply", extra={"name": reply.get("name"), "error": str(exc)})
