"""Where libvirt runs: its event loop on a thread of its own, blocking calls on a bounded pool.

libvirt-python calls block: a `create` starts qemu (a second or more under TCG), a define with
validation may re-probe qemu's capabilities (seconds on a host whose /dev/kvm libvirt cannot
open), a hung NFS pool or a libvirtd that accepts and never answers blocks forever (libvirt has
no open timeout). On the agent's asyncio loop any of these would stall pings, streams, the
systemd watchdog and every other VM. So, as Nova and VDSM do:

- libvirt's own default event implementation runs on one daemon thread
  (`virEventRunDefaultImpl`), registered once per process before the first connection. It
  drives lifecycle events, close callbacks and stream events; our callbacks hand
  their work to the asyncio loop with ``call_soon_threadsafe`` and never block it.
- every blocking call goes through :func:`call`: a worker thread from a bounded pool, with a
  timeout. A call that does not answer in time fails with :class:`LibvirtTimeout`; its thread is
  left to finish (a thread cannot be cancelled): it ends when the daemon answers or goes away.
- two lanes: ``ops`` for the work that changes VMs (defines, starts, stops, volumes; as many
  threads as operations may run at once) and ``query`` for the quick reads a ping, a scrape or a
  stream needs, so they never queue behind thirty VMs being started.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import threading
from typing import Any, Callable, Literal, TypeVar

import libvirt

from drivers.base import DriverError

T = TypeVar("T")

log = logging.getLogger("herdsman.libvirt")

DEFAULT_WORKERS = 16
QUERY_WORKERS = 4
DEFAULT_TIMEOUT = 120.0

Lane = Literal["ops", "query", "probe"]
#: threads per lane other than "ops" (whose size follows the configuration)
_LANE_WORKERS = {"query": QUERY_WORKERS, "probe": 4}


class LibvirtTimeout(DriverError):
    """A libvirt call did not answer within its timeout (libvirtd hung, storage stuck)."""


class _EventThread:
    """libvirt's default event loop, run forever on one daemon thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def ensure(self) -> None:
        with self._lock:
            if self._thread is not None:
                return
            # Errors arrive as exceptions; without a handler libvirt also prints each to stderr.
            libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
            libvirt.virEventRegisterDefaultImpl()
            self._thread = threading.Thread(target=self._run, name="libvirt-events", daemon=True)
            self._thread.start()

    @staticmethod
    def _run() -> None:
        while True:
            try:
                libvirt.virEventRunDefaultImpl()
            except Exception:  # noqa: BLE001 - the thread must outlive one bad callback
                log.exception("libvirt event loop iteration failed")


_events = _EventThread()


def start_event_thread() -> None:
    """Register libvirt's default event implementation and run it (idempotent, thread-safe).

    Must run before the first ``libvirt.open`` whose events matter.
    """
    _events.ensure()


class _Pool:
    def __init__(self) -> None:
        self.workers = DEFAULT_WORKERS
        self.timeout = DEFAULT_TIMEOUT
        self._executors: dict[Lane, concurrent.futures.ThreadPoolExecutor] = {}
        self._lock = threading.Lock()

    def executor(self, lane: Lane) -> concurrent.futures.ThreadPoolExecutor:
        with self._lock:
            if lane not in self._executors:
                self._executors[lane] = concurrent.futures.ThreadPoolExecutor(
                    max_workers=self.workers if lane == "ops" else _LANE_WORKERS[lane],
                    thread_name_prefix=f"libvirt-{lane}")
            return self._executors[lane]


_pool = _Pool()


def configure(*, workers: int | None = None, timeout: float | None = None) -> None:
    """Set the pool size and the default call timeout (before the first call for `workers`)."""
    if workers is not None:
        _pool.workers = max(2, workers)
    if timeout is not None:
        _pool.timeout = timeout


def call_timeout() -> float:
    return _pool.timeout


def _describe(fn: Callable[..., Any]) -> str:
    target = fn.func if isinstance(fn, functools.partial) else fn
    return getattr(target, "__qualname__", None) or getattr(target, "__name__", None) or repr(target)


async def call(fn: Callable[..., T], *args: Any, timeout: float | None = None, what: str | None = None,
               lane: Lane = "ops") -> T:
    """Run ``fn(*args)`` on a libvirt worker thread of ``lane``; LibvirtTimeout after ``timeout`` s.

    ``timeout`` defaults to the configured one; ``None`` there means the default, ``0`` or less
    means no limit (for calls whose length is the user's business, e.g. a migration).
    """
    loop = asyncio.get_running_loop()
    future = loop.run_in_executor(_pool.executor(lane), fn, *args)
    limit = _pool.timeout if timeout is None else timeout
    if limit <= 0:
        return await future
    try:
        return await asyncio.wait_for(future, limit)
    except TimeoutError:
        raise LibvirtTimeout(f"libvirt did not answer {what or _describe(fn)} within {limit:g} s") from None


def on_loop(loop: asyncio.AbstractEventLoop, fn: Callable[..., Any], *args: Any) -> None:
    """From libvirt's event thread: run ``fn(*args)`` on the asyncio loop (dropped if it closed)."""
    if loop.is_closed():
        return
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:  # closed between the check and the call
        pass
