"""One supervised libvirt connection whose events are dispatched on the asyncio loop.

Lessons this module encodes:

- libvirt only delivers events, keepalives and close notices while an event loop
  implementation runs (CloudStack PR #8437 registered one and never ran it). libvirtaio runs
  it on the agent's asyncio loop: no thread per VM, no polling.
- After a reconnect the domain event callbacks must be registered again on the new
  connection, or events silently stop (KubeVirt #194). Every (re)open goes through one
  function that registers everything.
- A lost daemon is noticed by libvirt's close callback (EOF, keepalive timeout, error) and by
  ``isAlive()`` on use; the connection is then reopened with capped exponential backoff and
  jitter, so a fleet of agents does not hammer a restarting libvirtd in lock step.

Events that happen while disconnected are lost: connection listeners get ``True`` after every
(re)connect, which is the signal to resynchronise state from the domains themselves.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from typing import Any

import libvirt
import libvirtaio

from drivers.libvirt.events import LifecycleEvent, to_lifecycle_event

LifecycleListener = Callable[[LifecycleEvent], None]
ConnectionListener = Callable[[bool], None]

_CLOSE_REASONS = {
    libvirt.VIR_CONNECT_CLOSE_REASON_ERROR: "I/O error on the connection",
    libvirt.VIR_CONNECT_CLOSE_REASON_EOF: "end of file (daemon gone)",
    libvirt.VIR_CONNECT_CLOSE_REASON_KEEPALIVE: "keepalive timeout",
    libvirt.VIR_CONNECT_CLOSE_REASON_CLIENT: "closed by client",
}


class LibvirtUnavailable(RuntimeError):
    """Libvirt at a URI cannot be used right now; the message says why."""

    def __init__(self, uri: str, reason: str) -> None:
        super().__init__(f"libvirt at {uri} is unavailable: {reason}")
        self.uri = uri
        self.reason = reason


class _EventLoopBinding:
    """Routes libvirt's event callbacks to a libvirtaio implementation on the running loop.

    libvirt accepts exactly one event implementation per process, for good
    (``virEventRegisterImpl`` refuses a second one). An agent has one loop, but test suites
    run a fresh loop per test, and an implementation bound to a closed loop would never
    dispatch again. So the process registers these small trampolines once, and they forward
    to a libvirtaio implementation for the current loop. Each handle/timer stays with the
    implementation that created it, so rebinding never moves live callbacks between loops.
    """

    def __init__(self) -> None:
        self.impl: libvirtaio.virEventAsyncIOImpl | None = None
        self._owner: dict[int, libvirtaio.virEventAsyncIOImpl] = {}
        self._registered = False

    def bind(self, loop: asyncio.AbstractEventLoop, log: logging.Logger) -> None:
        old = self.impl
        if old is not None and old.loop is loop:
            return
        if old is not None and old.loop.is_running():
            raise RuntimeError("libvirt events are already dispatched on another running event "
                               "loop; a process can serve only one")
        if old is not None and not old.is_idle():
            log.warning("libvirt callbacks left on a finished event loop (connections not "
                        "closed?): %r", old)
        self.impl = libvirtaio.virEventAsyncIOImpl(loop=loop)
        if not self._registered:
            # Errors arrive as exceptions; without a handler libvirt also prints each to stderr.
            libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
            libvirt.virEventRegisterImpl(self._add_handle, self._update_handle,
                                         self._remove_handle, self._add_timeout,
                                         self._update_timeout, self._remove_timeout)
            self._registered = True

    def _current(self) -> libvirtaio.virEventAsyncIOImpl:
        if self.impl is None:  # cannot happen: bind() runs before any connection is opened
            raise RuntimeError("libvirt event implementation used before it was bound")
        return self.impl

    def _add_handle(self, fd: int, event: int, cb: Any, opaque: Any) -> int:
        impl = self._current()
        iden = impl._add_handle(fd, event, cb, opaque)
        self._owner[iden] = impl
        return iden

    def _add_timeout(self, timeout: int, cb: Any, opaque: Any) -> int:
        impl = self._current()
        iden = impl._add_timeout(timeout, cb, opaque)
        self._owner[iden] = impl
        return iden

    def _update_handle(self, watch: int, event: int) -> None:
        impl = self._owner.get(watch)
        if impl is not None and not impl.loop.is_closed():
            impl._update_handle(watch, event)

    def _update_timeout(self, timer: int, timeout: int) -> None:
        impl = self._owner.get(timer)
        if impl is not None and not impl.loop.is_closed():
            impl._update_timeout(timer, timeout)

    def _remove(self, iden: int, remove: Callable[[libvirtaio.virEventAsyncIOImpl], int]) -> int:
        impl = self._owner.pop(iden, None)
        if impl is None:
            return -1
        if impl.loop.is_closed():
            # Its loop can no longer run the free callback; dropping it leaks one small
            # libvirt object, which beats raising inside libvirt.
            impl.callbacks.pop(iden, None)
            return 0
        return remove(impl)

    def _remove_handle(self, watch: int) -> int:
        return self._remove(watch, lambda impl: impl._remove_handle(watch))

    def _remove_timeout(self, timer: int) -> int:
        return self._remove(timer, lambda impl: impl._remove_timeout(timer))


_binding = _EventLoopBinding()


def backoff_delay(attempt: int, initial: float, cap: float, rng: random.Random) -> float:
    """Delay before reconnect attempt ``attempt`` (0-based): doubling, capped, "equal jitter".

    Half of the delay is fixed and half random, so retries stay spread out but never collapse
    to zero.
    """
    base = min(cap, initial * (2 ** min(attempt, 30)))
    return base / 2 + rng.uniform(0, base / 2)


class LibvirtConnection:
    """A libvirt connection that reopens itself and keeps its lifecycle callback registered.

    Blocking libvirt calls run on the loop thread (libvirtaio is not thread-safe); libvirt has
    no open timeout, so a daemon that accepts but never answers would stall ``start``.
    """

    def __init__(self, uri: str, *, backoff_initial: float = 0.5, backoff_cap: float = 30.0,
                 keepalive_interval: int = 5, keepalive_count: int = 3,
                 logger: logging.Logger | None = None) -> None:
        self.uri = uri
        self._backoff_initial = backoff_initial
        self._backoff_cap = backoff_cap
        self._keepalive = (keepalive_interval, keepalive_count)
        self._log = logger or logging.getLogger(__name__)
        self._rng = random.Random()
        self._conn: libvirt.virConnect | None = None
        self._dead: libvirt.virConnect | None = None  # lost, waiting to be cleaned up
        self._callback_id: int | None = None
        self._reason = "not started"
        self._lifecycle_listeners: list[LifecycleListener] = []
        self._connection_listeners: list[ConnectionListener] = []
        self._crashed: set[str] = set()
        self._up = asyncio.Event()
        self._lost = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    # -- public ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Bind libvirt's events to this loop, try to connect once, then supervise.

        Returns even when libvirt is not there yet: the supervisor keeps retrying. Calling it
        again is harmless; a closed connection stays closed.
        """
        _binding.bind(asyncio.get_running_loop(), self._log)
        if self._task is not None or self._closed:
            return
        self._try_open()
        self._task = asyncio.create_task(self._supervise(), name=f"libvirt-connection {self.uri}")

    async def wait_connected(self, timeout: float) -> None:
        """Wait until connected; raise :class:`LibvirtUnavailable` after ``timeout`` seconds."""
        try:
            await asyncio.wait_for(self._up.wait(), timeout)
        except TimeoutError:
            raise LibvirtUnavailable(self.uri, f"{self._reason} (waited {timeout:g} s)") from None

    @property
    def connected(self) -> bool:
        return self._conn is not None

    def get(self) -> libvirt.virConnect:
        """The open connection, or :class:`LibvirtUnavailable` if there is none right now."""
        conn = self._conn
        if conn is not None and not conn.isAlive():
            self._mark_lost("connection is no longer alive")
            conn = None
        if conn is None:
            raise LibvirtUnavailable(self.uri, self._reason)
        return conn

    def add_lifecycle_listener(self, cb: LifecycleListener) -> None:
        """``cb`` gets every domain lifecycle event, on the event loop thread."""
        self._lifecycle_listeners.append(cb)

    def add_connection_listener(self, cb: ConnectionListener) -> None:
        """``cb(True)`` after every (re)connect, ``cb(False)`` when the connection is lost."""
        self._connection_listeners.append(cb)

    async def close(self) -> None:
        """Stop reconnecting, deregister callbacks and close the connection."""
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        self._teardown()
        self._reason = "connection closed"
        # libvirtaio frees removed handles/timers from callbacks it schedules on the loop.
        for _ in range(3):
            await asyncio.sleep(0)

    # -- supervision ----------------------------------------------------------------------

    async def _supervise(self) -> None:
        attempt = 0
        while True:
            try:
                if self._conn is None:
                    await asyncio.sleep(backoff_delay(attempt, self._backoff_initial,
                                                      self._backoff_cap, self._rng))
                    attempt += 1
                    if not self._try_open(loud=attempt == 1):
                        continue
                attempt = 0
                await self._lost.wait()
                self._lost.clear()
                dead, self._dead = self._dead, None
                if dead is not None:
                    self._drop(dead)
                self._log.warning("libvirt at %s lost: %s; reconnecting", self.uri, self._reason)
                self._notify(False)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - a dead supervisor would mean no reconnect, ever
                self._log.exception("libvirt connection supervisor for %s", self.uri)
                await asyncio.sleep(self._backoff_cap)

    def _try_open(self, loud: bool = True) -> bool:
        """Open and fully register a connection; on failure remember why and return False."""
        try:
            conn = libvirt.open(self.uri)
        except libvirt.libvirtError as e:
            self._reason = str(e).strip() or "open failed"
            self._log.log(logging.WARNING if loud else logging.DEBUG,
                          "libvirt at %s unavailable, retrying: %s", self.uri, self._reason)
            return False
        try:
            self._register(conn)
        except libvirt.libvirtError as e:
            self._reason = f"registering callbacks failed: {e}"
            self._log.warning("libvirt at %s: %s", self.uri, self._reason)
            self._drop(conn)
            return False
        self._conn = conn
        self._up.set()
        self._reason = "connected"
        self._log.info("connected to libvirt at %s", self.uri)
        self._notify(True)
        return True

    def _register(self, conn: libvirt.virConnect) -> None:
        """Everything a fresh connection needs; runs on every (re)open."""
        try:
            conn.setKeepAlive(*self._keepalive)
        except libvirt.libvirtError as e:
            # Local drivers (test:///, embedded) have no keepalive; EOF still closes them.
            if e.get_error_code() != libvirt.VIR_ERR_NO_SUPPORT:
                raise
        conn.registerCloseCallback(self._on_close, None)
        self._callback_id = conn.domainEventRegisterAny(
            None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on_lifecycle, None)

    def _teardown(self) -> None:
        conn, self._conn = self._conn, None
        dead, self._dead = self._dead, None
        self._up.clear()
        for c in (conn, dead):
            if c is not None:
                self._drop(c)

    def _drop(self, conn: libvirt.virConnect) -> None:
        """Deregister and close; on a dead connection some of this fails, which is fine."""
        callback_id, self._callback_id = self._callback_id, None
        steps: list[Callable[[], object]] = [conn.unregisterCloseCallback, conn.close]
        if callback_id is not None:
            steps.insert(0, lambda: conn.domainEventDeregisterAny(callback_id))
        for step in steps:
            try:
                step()
            except libvirt.libvirtError as e:
                self._log.debug("libvirt cleanup on %s: %s", self.uri, e)

    def _mark_lost(self, reason: str) -> None:
        """Forget the connection at once (``get`` fails from now on); the supervisor reopens."""
        if self._conn is None or self._closed:
            return
        self._dead, self._conn = self._conn, None
        self._reason = reason
        self._up.clear()
        self._lost.set()

    # -- libvirt callbacks (run on the loop thread by libvirtaio) -------------------------

    def _on_close(self, conn: libvirt.virConnect, reason: int, opaque: object) -> None:
        if conn is self._conn:  # not a stale connection that is being cleaned up
            self._mark_lost(_CLOSE_REASONS.get(reason, f"closed (reason {reason})"))

    def _on_lifecycle(self, conn: libvirt.virConnect, dom: libvirt.virDomain, event: int,
                      detail: int, opaque: object) -> None:
        uuid = dom.UUIDString()
        ev = to_lifecycle_event(uuid, dom.name(), event, detail, time.time(),
                                after_crash=uuid in self._crashed)
        if ev.event == "crashed":
            self._crashed.add(uuid)
        else:
            self._crashed.discard(uuid)
        for cb in list(self._lifecycle_listeners):
            try:
                cb(ev)
            except Exception:  # noqa: BLE001 - one broken listener must not starve the rest
                self._log.exception("lifecycle listener failed on %s", ev)

    def _notify(self, up: bool) -> None:
        for cb in list(self._connection_listeners):
            try:
                cb(up)
            except Exception:  # noqa: BLE001 - one broken listener must not starve the rest
                self._log.exception("connection listener failed (connected=%s)", up)
