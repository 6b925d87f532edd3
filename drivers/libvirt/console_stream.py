"""One libvirt console session per VM, shared by every viewer (a hub).

libvirt lets one client at a time hold a domain's console: a second open is refused, and an
open with FORCE kicks the first holder. So the agent opens the console once per VM and fans
its output out to all viewers; input from any viewer goes to the guest in arrival order.

Policy, and why:

- **Scrollback.** The last ``scrollback`` bytes (64 KiB) are replayed to each new viewer. The
  hub starts with the tail of the VM's serial log (virtlogd writes it whether or not anyone
  watches), so a viewer arriving after boot still sees the boot and the last prompt.
- **Slow viewers are dropped, never waited for.** Each viewer may have ``viewer_budget`` bytes
  (1 MiB) of output queued; past that it is ended with reason ``"slow"`` and its queue freed.
  Waiting instead would stall every other viewer, then the guest itself: qemu stops draining
  the UART once the console's pty is full.
- **Input** waits while more than ``input_budget`` bytes (64 KiB) are queued for libvirt, which
  pushes back on the viewer's websocket instead of buffering without limit.
- **Restarts.** The libvirt stream ends when qemu exits (stop, restart) or when another client
  takes the console. If the VM is off or runs a new qemu process (new domain id), the hub waits
  for it to run and reopens with FORCE; viewers stay connected throughout. If the same qemu
  still runs, someone else opened the console with FORCE (``virsh console --force``): the hub
  reopens without force and, if refused, ends its viewers with reason ``"taken"`` — the last
  forceful opener wins, without a tug of war. A VM that disappears ends viewers with ``"gone"``.
  A guest reboot inside the same qemu does not end the stream at all.
- The hub closes its libvirt stream as soon as its last viewer leaves.

Threads: the hub's state lives on the asyncio loop. libvirt calls the stream callback on its
event thread (drivers.libvirt.threads), which drains what the stream holds (non-blocking) and
hands the bytes to the loop; opening and closing a console are daemon round trips and run on
libvirt worker threads.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import libvirt

from drivers.base import ConsoleClosed, ConsoleEnded, DriverError, NotFound, Unavailable
from drivers.libvirt import threads

SCROLLBACK_BYTES = 64 * 1024
VIEWER_BUDGET_BYTES = 1024 * 1024
INPUT_BUDGET_BYTES = 64 * 1024
READ_CHUNK = 64 * 1024
_REOPEN_MAX_DELAY = 1.0
_EVENTS_READ = libvirt.VIR_STREAM_EVENT_READABLE | libvirt.VIR_STREAM_EVENT_ERROR | libvirt.VIR_STREAM_EVENT_HANGUP


class ConsoleDomains(Protocol):
    """What the hub needs from the driver (LibvirtDriver provides both)."""

    async def domain(self, instance_uuid: str) -> libvirt.virDomain: ...

    def console_log_path(self, instance_uuid: str) -> Path | None: ...


class ConsoleViewer:
    """One reader/writer of a shared console. ``read`` gives output, ``write`` sends input."""

    def __init__(self, hub: ConsoleHub, budget: int) -> None:
        self._hub = hub
        self._budget = budget
        self._chunks: deque[bytes] = deque()
        self._pending = 0
        self._wake = asyncio.Event()
        self.ended: ConsoleEnded | None = None

    @property
    def pending(self) -> int:
        """Bytes of output queued for this viewer and not yet read."""
        return self._pending

    def _feed(self, data: bytes) -> bool:
        """Queue output; False (and the viewer ended) when it is over its budget."""
        if self.ended is not None:
            return True
        self._chunks.append(data)
        self._pending += len(data)
        self._wake.set()
        if self._pending <= self._budget:
            return True
        self._end(ConsoleEnded("slow", f"this viewer fell more than {self._budget} bytes behind the "
                                       "console and was disconnected; reconnect to resume"))
        self._chunks.clear()
        self._pending = 0
        return False

    def _end(self, ended: ConsoleEnded) -> None:
        if self.ended is None:
            self.ended = ended
        self._wake.set()

    async def read(self, max_bytes: int = READ_CHUNK, linger: float = 0.0) -> bytes:
        """The next output (everything queued, up to ``max_bytes``); ConsoleClosed at the end.

        ``linger`` seconds are waited after the first bytes when there are few, to send fewer,
        larger frames: a serial console arrives in pieces of ~20 bytes (one per libvirt stream
        message), and a frame per piece would cost more CPU than the data is worth.
        Output queued before the end is still delivered, except to a viewer dropped as slow.
        """
        while not self._chunks:
            if self.ended is not None:
                raise ConsoleClosed(self.ended)
            self._wake.clear()
            await self._wake.wait()
        if linger > 0 and self._pending < max_bytes // 4 and self.ended is None:
            await asyncio.sleep(linger)
        if not self._chunks:  # dropped as slow while lingering
            raise ConsoleClosed(self.ended or ConsoleEnded("closed", "viewer left"))
        parts: list[bytes] = []
        size = 0
        while self._chunks and size < max_bytes:
            chunk = self._chunks.popleft()
            if size + len(chunk) > max_bytes:
                cut = max_bytes - size
                self._chunks.appendleft(chunk[cut:])
                chunk = chunk[:cut]
            parts.append(chunk)
            size += len(chunk)
        self._pending -= size
        return b"".join(parts)

    async def write(self, data: bytes) -> None:
        """Type ``data`` into the console (waits while the input queue is full)."""
        if self.ended is not None:
            raise ConsoleClosed(self.ended)
        await self._hub.write(data)

    def close(self) -> None:
        """Leave the console; the last viewer to leave closes the libvirt session."""
        self._end(ConsoleEnded("closed", "viewer left"))
        self._hub.detach(self)


class ConsoleHub:
    """The libvirt console of one VM and its viewers. Made by :class:`ConsoleHubs`."""

    def __init__(self, domains: ConsoleDomains, instance_uuid: str, on_empty: Callable[[ConsoleHub], None], *,
                 scrollback: int = SCROLLBACK_BYTES, viewer_budget: int = VIEWER_BUDGET_BYTES,
                 input_budget: int = INPUT_BUDGET_BYTES, logger: logging.Logger | None = None) -> None:
        self.instance_uuid = instance_uuid
        self._domains = domains
        self._on_empty = on_empty
        self._scrollback_limit = scrollback
        self._viewer_budget = viewer_budget
        self._input_budget = input_budget
        self._log = logger or logging.getLogger("herdsman.console")
        self._viewers: list[ConsoleViewer] = []
        self._history = bytearray()
        self._outbox = bytearray()
        self._outbox_room = asyncio.Event()
        self._outbox_room.set()
        self._stream: libvirt.virStream | None = None
        self._stream_events = 0
        self._domain_id = -1
        self._recovery: asyncio.Task[None] | None = None
        self._closed = False
        self._loop = asyncio.get_running_loop()
        self._cleanups: set[asyncio.Task[None]] = set()
        self.reopened = 0  # how many times the libvirt stream was reopened (for tests and logs)

    # -- viewers ------------------------------------------------------------------------------
    async def start(self) -> None:
        """Prime the scrollback from the serial log and open the console (raises DriverError)."""
        await asyncio.to_thread(self._prime_history)
        dom = await self._domains.domain(self.instance_uuid)
        if not await threads.call(dom.isActive):
            raise DriverError("the VM is not running; its console opens once it is started")
        await self._open(dom, force=True)

    def attach(self) -> ConsoleViewer:
        viewer = ConsoleViewer(self, self._viewer_budget)
        if self._history:
            viewer._feed(bytes(self._history))
        self._viewers.append(viewer)
        return viewer

    def detach(self, viewer: ConsoleViewer) -> None:
        if viewer in self._viewers:
            self._viewers.remove(viewer)
        if not self._viewers:
            self.close()

    @property
    def viewers(self) -> int:
        return len(self._viewers)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._recovery is not None:
            self._recovery.cancel()
        self._close_stream(abort=True)
        for viewer in list(self._viewers):
            viewer._end(ConsoleEnded("closed", "the console was closed"))
        self._viewers.clear()
        self._outbox_room.set()
        self._on_empty(self)

    def _end_all(self, ended: ConsoleEnded) -> None:
        self._log.info("console of %s ended: %s", self.instance_uuid, ended.message)
        for viewer in list(self._viewers):
            viewer._end(ended)
        self._viewers.clear()
        self.close()

    # -- input ----------------------------------------------------------------------------------
    async def write(self, data: bytes) -> None:
        while len(self._outbox) >= self._input_budget and not self._closed:
            self._outbox_room.clear()
            await self._outbox_room.wait()
        if self._closed:
            raise ConsoleClosed(ConsoleEnded("closed", "the console was closed"))
        self._outbox.extend(data)
        self._flush()

    def _flush(self) -> None:
        stream = self._stream
        while stream is not None and self._outbox:
            try:
                sent = stream.send(bytes(self._outbox[:READ_CHUNK]))
            except libvirt.libvirtError as exc:
                self._stream_ended(f"send failed: {exc}")
                return
            if sent == -2:
                break
            del self._outbox[:sent]
        if len(self._outbox) < self._input_budget:
            self._outbox_room.set()
        self._watch(writable=bool(self._outbox))

    # -- the libvirt stream ------------------------------------------------------------------------
    def _prime_history(self) -> None:
        try:
            path = self._domains.console_log_path(self.instance_uuid)
            if path is None:
                raise OSError("no serial log")
            with open(path, "rb") as f:
                size = f.seek(0, 2)
                f.seek(max(0, size - self._scrollback_limit))
                self._history = bytearray(f.read(self._scrollback_limit))
        except (OSError, AttributeError):
            self._history = bytearray()  # no log (logConfig none) or not readable: start empty

    async def _open(self, dom: libvirt.virDomain, *, force: bool) -> None:
        stream, domain_id = await threads.call(self._open_stream, dom, force, what="openConsole")
        if self._closed:  # the last viewer left while the console was opening
            self._discard(stream, abort=True)
            return
        self._stream, self._stream_events = stream, _EVENTS_READ
        self._domain_id = domain_id
        self._flush()

    def _open_stream(self, dom: libvirt.virDomain, force: bool) -> tuple[libvirt.virStream, int]:
        """On a worker thread: a non-blocking stream on the domain's console, watched."""
        stream = dom.connect().newStream(libvirt.VIR_STREAM_NONBLOCK)
        try:
            dom.openConsole(None, stream, libvirt.VIR_DOMAIN_CONSOLE_FORCE if force else 0)
            stream.eventAddCallback(_EVENTS_READ, self._on_event, None)
        except libvirt.libvirtError:
            try:
                stream.abort()
            except libvirt.libvirtError:
                pass
            raise
        return stream, dom.ID()

    def _watch(self, *, writable: bool) -> None:
        events = _EVENTS_READ | (libvirt.VIR_STREAM_EVENT_WRITABLE if writable else 0)
        if self._stream is not None and events != self._stream_events:
            try:
                self._stream.eventUpdateCallback(events)
                self._stream_events = events
            except libvirt.libvirtError as exc:
                self._stream_ended(f"event update failed: {exc}")

    def _on_event(self, stream: libvirt.virStream, events: int, _opaque: object) -> None:
        """On libvirt's event thread: drain the stream without blocking, hand it to the loop."""
        writable = bool(events & libvirt.VIR_STREAM_EVENT_WRITABLE)
        if writable:  # level-triggered: stop watching until the loop has flushed and re-armed
            try:
                stream.eventUpdateCallback(_EVENTS_READ)
            except libvirt.libvirtError:
                pass
        chunks: list[bytes] = []
        why: str | None = None
        while True:
            try:
                data = stream.recv(READ_CHUNK)
            except libvirt.libvirtError as exc:
                why = f"console stream failed: {exc}"
                break
            if data == -2:
                break
            if not data:
                why = "console stream ended (end of file)"
                break
            chunks.append(data)
        if why is None and events & (libvirt.VIR_STREAM_EVENT_ERROR | libvirt.VIR_STREAM_EVENT_HANGUP):
            why = "console stream hung up"
        threads.on_loop(self._loop, self._deliver, stream, chunks, writable, why)

    def _deliver(self, stream: libvirt.virStream, chunks: list[bytes], writable: bool, why: str | None) -> None:
        if stream is not self._stream:
            return
        if writable:
            self._stream_events = _EVENTS_READ  # as the event thread left it
            self._flush()
        for data in chunks:
            self._publish(data)
            if stream is not self._stream:  # the last viewer was dropped: the hub closed
                return
        if why is not None:
            self._stream_ended(why)

    def _publish(self, data: bytes) -> None:
        self._history.extend(data)
        if len(self._history) > self._scrollback_limit:
            del self._history[:len(self._history) - self._scrollback_limit]
        for viewer in list(self._viewers):
            if not viewer._feed(data):
                self._log.warning("console viewer of %s dropped: %s", self.instance_uuid,
                                  viewer.ended.message if viewer.ended else "slow")
                self.detach(viewer)

    def _close_stream(self, *, abort: bool) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            self._discard(stream, abort=abort)

    def _discard(self, stream: libvirt.virStream, *, abort: bool) -> None:
        """Stop watching and end the stream: a daemon round trip, so on a worker thread."""
        def end() -> None:
            for step in (stream.eventRemoveCallback, stream.abort if abort else stream.finish):
                try:
                    step()
                except libvirt.libvirtError:
                    pass

        async def cleanup() -> None:
            try:
                await threads.call(end, timeout=30, what="closing a console stream")
            except DriverError as exc:
                self._log.debug("console of %s: %s", self.instance_uuid, exc)

        task = self._loop.create_task(cleanup())
        self._cleanups.add(task)
        task.add_done_callback(self._cleanups.discard)

    def _stream_ended(self, why: str) -> None:
        self._close_stream(abort=True)
        if self._closed or self._recovery is not None:
            return
        self._log.info("console of %s: %s; reopening", self.instance_uuid, why)
        self._recovery = self._loop.create_task(self._recover(), name=f"console-reopen {self.instance_uuid}")

    async def _recover(self) -> None:
        """Reopen after the stream ended: see the module docstring for the policy."""
        delay = 0.1
        try:
            while not self._closed:
                try:
                    dom = await self._domains.domain(self.instance_uuid)
                    active, domain_id = await threads.call(lambda: (dom.isActive(), dom.ID()))
                    if active:
                        same = domain_id == self._domain_id
                        try:
                            await self._open(dom, force=not same)
                            self.reopened += 1
                            return
                        except libvirt.libvirtError as exc:
                            if same and exc.get_error_code() == libvirt.VIR_ERR_OPERATION_FAILED:
                                self._end_all(ConsoleEnded("taken", "another client took over this "
                                                                    f"console ({exc.get_error_message()})"))
                                return
                            self._log.debug("console of %s not reopened yet: %s", self.instance_uuid, exc)
                except NotFound:
                    self._end_all(ConsoleEnded("gone", "the VM no longer exists"))
                    return
                except (Unavailable, DriverError, libvirt.libvirtError) as exc:
                    self._log.debug("console of %s waits for libvirt: %s", self.instance_uuid, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, _REOPEN_MAX_DELAY)
        finally:
            self._recovery = None


class ConsoleHubs:
    """The hubs of one driver, keyed by instance uuid: ``attach(uuid)`` joins (or opens) one."""

    def __init__(self, domains: ConsoleDomains, *, scrollback: int = SCROLLBACK_BYTES,
                 viewer_budget: int = VIEWER_BUDGET_BYTES, logger: logging.Logger | None = None) -> None:
        self._domains = domains
        self._scrollback = scrollback
        self._viewer_budget = viewer_budget
        self._log = logger or logging.getLogger("herdsman.console")
        self._hubs: dict[str, ConsoleHub] = {}
        self._opening: dict[str, asyncio.Future[ConsoleHub]] = {}

    async def attach(self, instance_uuid: str) -> ConsoleViewer:
        """A new viewer of the VM's console (NotFound, Unavailable or DriverError if it can't open)."""
        hub = self._hubs.get(instance_uuid)
        if hub is None:
            opening = self._opening.get(instance_uuid)
            if opening is None:  # one open per VM even when viewers arrive together
                opening = asyncio.ensure_future(self._open_hub(instance_uuid))
                self._opening[instance_uuid] = opening
                opening.add_done_callback(lambda _: self._opening.pop(instance_uuid, None))
            hub = await asyncio.shield(opening)
        return hub.attach()

    async def _open_hub(self, instance_uuid: str) -> ConsoleHub:
        hub = ConsoleHub(self._domains, instance_uuid, self._forget, scrollback=self._scrollback,
                         viewer_budget=self._viewer_budget, logger=self._log)
        try:
            await hub.start()
        except libvirt.libvirtError as exc:
            raise DriverError(f"cannot open the console: {exc.get_error_message() or exc}") from None
        self._hubs[instance_uuid] = hub
        return hub

    def hub(self, instance_uuid: str) -> ConsoleHub | None:
        return self._hubs.get(instance_uuid)

    def close(self) -> None:
        for hub in list(self._hubs.values()):
            hub.close()

    def _forget(self, hub: ConsoleHub) -> None:
        if self._hubs.get(hub.instance_uuid) is hub:
            del self._hubs[hub.instance_uuid]
