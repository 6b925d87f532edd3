"""One supervised libvirt connection whose events reach the asyncio loop.

Lessons this module encodes:

- libvirt only delivers events, keepalives and close notices while an event loop
  implementation runs (CloudStack PR #8437 registered one and never ran it). It runs on a
  thread of its own (drivers.libvirt.threads); callbacks hand their work to the asyncio loop.
- After a reconnect the domain event callbacks must be registered again on the new
  connection, or events silently stop (KubeVirt #194). Every (re)open goes through one
  function that registers everything.
- A lost daemon is noticed by libvirt's close callback (EOF, error), by ``isAlive()`` on use,
  and a hung one by our own liveness probe: a cheap call every few seconds that must answer
  within ``probe_interval * probe_misses``. libvirt's own client keepalive is switched off: in
  libvirt 9.0 a keepalive timeout with several calls waiting on the connection fails the first
  and leaves the others waiting for ever (and the process crashes later), while an end of file
  fails them all. A connection given up this way is not closed while calls may still wait on
  it; it goes when its last user lets go. The connection is then reopened with capped
  exponential backoff and jitter, so a fleet of agents does not hammer a restarting libvirtd in
  lock step.
- ``libvirt.open`` has no timeout: a daemon that accepts and never answers would block the
  caller for good. The open runs on a worker thread with a timeout; a connection that arrives
  after its caller gave up is closed at once.

Events that happen while disconnected are lost: connection listeners get ``True`` after every
(re)connect, which is the signal to resynchronise state from the domains themselves.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import threading
import time
from collections.abc import Callable

import libvirt

from drivers.libvirt import threads
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


def backoff_delay(attempt: int, initial: float, cap: float, rng: random.Random) -> float:
    """Delay before reconnect attempt ``attempt`` (0-based): doubling, capped, "equal jitter".

    Half of the delay is fixed and half random, so retries stay spread out but never collapse
    to zero.
    """
    base = min(cap, initial * (2 ** min(attempt, 30)))
    return base / 2 + rng.uniform(0, base / 2)


class LibvirtConnection:
    """A libvirt connection that reopens itself and keeps its lifecycle callback registered.

    Listeners are called on the asyncio loop. ``get()`` hands out the connection for calls,
    which callers make through :func:`drivers.libvirt.threads.call`, never on the loop.
    """

    def __init__(self, uri: str, *, backoff_initial: float = 0.5, backoff_cap: float = 30.0,
                 probe_interval: float = 5.0, probe_misses: int = 3, open_timeout: float = 30.0,
                 logger: logging.Logger | None = None) -> None:
        self.uri = uri
        self.open_timeout = open_timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        self._backoff_initial = backoff_initial
        self._backoff_cap = backoff_cap
        self._probe = (probe_interval, probe_misses)
        self._log = logger or logging.getLogger(__name__)
        self._rng = random.Random()
        self._conn: libvirt.virConnect | None = None
        self._dead: libvirt.virConnect | None = None  # lost, waiting to be cleaned up
        self._callback_id: int | None = None
        self._reason = "not started"
        self._lifecycle_listeners: list[LifecycleListener] = []
        self._connection_listeners: list[ConnectionListener] = []
        self._crashed: set[str] = set()
        self._prober: asyncio.Task[None] | None = None
        self._hung = False
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
        threads.start_event_thread()
        if self._task is not None or self._closed:
            return
        self._loop = asyncio.get_running_loop()
        await self._try_open()
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
        if self._prober is not None:
            self._prober.cancel()
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        await self._teardown()
        self._reason = "connection closed"

    # -- supervision ----------------------------------------------------------------------

    async def _supervise(self) -> None:
        attempt = 0
        while True:
            try:
                if self._conn is None:
                    await asyncio.sleep(backoff_delay(attempt, self._backoff_initial,
                                                      self._backoff_cap, self._rng))
                    attempt += 1
                    if not await self._try_open(loud=attempt == 1):
                        continue
                attempt = 0
                await self._lost.wait()
                self._lost.clear()
                self._log.warning("libvirt at %s lost: %s; reconnecting", self.uri, self._reason)
                self._notify(False)
                dead, self._dead = self._dead, None
                if dead is not None and not self._hung:
                    # a hung daemon would hold this forever; its callbacks are ignored anyway
                    await self._drop(dead)
                self._hung = False
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - a dead supervisor would mean no reconnect, ever
                self._log.exception("libvirt connection supervisor for %s", self.uri)
                await asyncio.sleep(self._backoff_cap)

    async def _try_open(self, loud: bool = True) -> bool:
        """Open and fully register a connection; on failure remember why and return False."""
        opening = _Opening(self.uri)
        try:
            conn = await threads.call(opening.open, timeout=self.open_timeout, what=f"open {self.uri}")
        except (libvirt.libvirtError, threads.LibvirtTimeout) as e:
            opening.abandon()
            self._reason = str(e).strip() or "open failed"
            self._log.log(logging.WARNING if loud else logging.DEBUG,
                          "libvirt at %s unavailable, retrying: %s", self.uri, self._reason)
            return False
        try:
            await threads.call(self._register, conn, timeout=self.open_timeout)
        except (libvirt.libvirtError, threads.LibvirtTimeout) as e:
            self._reason = f"registering callbacks failed: {e}"
            self._log.warning("libvirt at %s: %s", self.uri, self._reason)
            await self._drop(conn)
            return False
        if self._closed:  # close() ran while we were opening
            await self._drop(conn)
            return False
        self._conn = conn
        self._up.set()
        self._reason = "connected"
        self._prober = asyncio.get_running_loop().create_task(self._probe_liveness(conn), name=f"libvirt-probe {self.uri}")
        self._log.info("connected to libvirt at %s", self.uri)
        self._notify(True)
        return True

    def _register(self, conn: libvirt.virConnect) -> None:
        """Everything a fresh connection needs; runs on every (re)open."""
        try:
            conn.setKeepAlive(-1, 0)  # off: see the module docstring; _probe_liveness does its job
        except libvirt.libvirtError as e:
            # Local drivers (test:///, embedded) have no keepalive; EOF still closes them.
            if e.get_error_code() != libvirt.VIR_ERR_NO_SUPPORT:
                raise
        conn.registerCloseCallback(self._on_close, None)
        self._callback_id = conn.domainEventRegisterAny(
            None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on_lifecycle, None)

    async def _probe_liveness(self, conn: libvirt.virConnect) -> None:
        """While `conn` is the connection: a cheap round trip every interval; no answer within
        interval × misses means the daemon hangs, and the connection is given up."""
        interval, misses = self._probe
        limit = interval * misses
        while self._conn is conn:
            await asyncio.sleep(interval)
            try:
                await threads.call(conn.getLibVersion, timeout=limit, lane="probe",
                                   what=f"a liveness probe of {self.uri}")
            except threads.LibvirtTimeout:
                if self._conn is conn:
                    self._hung = True
                    self._mark_lost(f"libvirtd did not answer for {limit:g} s (hung?)")
                return
            except libvirt.libvirtError as e:
                if self._conn is conn and not conn.isAlive():
                    self._mark_lost(str(e).strip() or "connection failed")
                    return

    async def _teardown(self) -> None:
        conn, self._conn = self._conn, None
        dead, self._dead = self._dead, None
        self._up.clear()
        for c in (conn, dead):
            if c is not None:
                await self._drop(c)

    async def _drop(self, conn: libvirt.virConnect) -> None:
        """Deregister and let go (on a worker thread, with a short timeout: it may be dead)."""
        callback_id, self._callback_id = self._callback_id, None
        try:
            await threads.call(self._drop_now, conn, callback_id, timeout=10, what=f"close {self.uri}")
        except threads.LibvirtTimeout as e:
            self._log.debug("libvirt cleanup on %s: %s", self.uri, e)

    def _drop_now(self, conn: libvirt.virConnect, callback_id: int | None) -> None:
        """Deregister our callbacks. The connection is not closed here: other worker threads
        may still be inside a call on it (a hung daemon, a slow create), and closing a
        connection under a running call crashes the process. The last reference to go (the
        call's own, when it returns or fails) closes it."""
        steps: list[Callable[[], object]] = [conn.unregisterCloseCallback]
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

    # -- libvirt callbacks: on libvirt's event thread, handed to the loop -----------------

    def _on_close(self, conn: libvirt.virConnect, reason: int, opaque: object) -> None:
        if self._loop is not None:
            threads.on_loop(self._loop, self._closed_by_libvirt, conn, reason)

    def _closed_by_libvirt(self, conn: libvirt.virConnect, reason: int) -> None:
        if conn is self._conn:  # not a stale connection that is being cleaned up
            self._mark_lost(_CLOSE_REASONS.get(reason, f"closed (reason {reason})"))

    def _on_lifecycle(self, conn: libvirt.virConnect, dom: libvirt.virDomain, event: int,
                      detail: int, opaque: object) -> None:
        # name and uuid are kept in the domain object: no call to the daemon here
        if self._loop is not None:
            threads.on_loop(self._loop, self._dispatch_lifecycle, conn, dom.UUIDString(), dom.name(),
                            event, detail, time.time())

    def _dispatch_lifecycle(self, conn: libvirt.virConnect, uuid: str, name: str, event: int, detail: int,
                            when: float) -> None:
        if conn is not self._conn:
            return  # a connection given up (hung daemon) that came back to life: old news
        ev = to_lifecycle_event(uuid, name, event, detail, when, after_crash=uuid in self._crashed)
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


class _Opening:
    """One ``libvirt.open`` on a worker thread; closes its connection if nobody waits any more."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self._lock = threading.Lock()
        self._abandoned = False

    def open(self) -> libvirt.virConnect:
        conn = libvirt.open(self.uri)
        with self._lock:
            if not self._abandoned:
                return conn
        with contextlib.suppress(libvirt.libvirtError):
            conn.close()
        raise libvirt.libvirtError(f"connection to {self.uri} arrived after its caller gave up")

    def abandon(self) -> None:
        with self._lock:
            self._abandoned = True
