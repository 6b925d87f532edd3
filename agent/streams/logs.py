"""The `logs` stream: a VM's serial console log (written by virtlogd), last N lines, then follow.

Cattle's logs framing (cattle-protocol.md §5): one text message per line, prefixed "00 " (the
combined/TTY stream: a serial console has no stdout/stderr split), no line ending; messages
from the client are ignored and its close ends the stream. `Timestamps` and `Since` are not
supported: the serial log carries no timestamps.

How the file is read:
- the last N lines are found by reading backwards in blocks, across the rotated files
  (`.log.0`, `.log.1`...) when the current one is shorter than N lines, so the cost is
  proportional to what is sent, not to the log's size;
- following polls (default every 0.2 s: a stat and a read per follower, cheaper than an
  inotify watch per stream and fast enough for a human);
- rotation: virtlogd renames the full file to `.log.0` and creates a new one. The follower
  keeps its descriptor on the old file, drains it to the end, then continues with the file that
  came after it, from its first byte: nothing lost, nothing repeated. A file truncated in place
  is read again from its start (noticed when it is seen shorter than what was read: as with
  `tail -f`, a file that regrows past that point between two polls goes unnoticed; virtlogd
  never truncates);
- a line whose end has not been written after `partial_after` seconds (a shell prompt) is sent
  as it is, so an interactive guest's output shows up; its rest comes as the next line;
- lines longer than MAX_LINE bytes are sent in pieces, so one runaway line cannot hold memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from websockets.asyncio.server import ServerConnection

from agent.streams.auth import Claims
from agent.streams.server import CLOSE_POLICY, CLOSE_UNAVAILABLE, close_with
from drivers.base import DriverError, NotFound

PREFIX = "00 "
BLOCK = 64 * 1024
MAX_LINE = 64 * 1024
MAX_LINES = 1_000_000
#: Never read more than this looking back (virtlogd keeps 4 × 2 MiB by default).
MAX_TAIL_BYTES = 64 << 20
DEFAULT_LINES = 100


class LogSource(Protocol):
    """What the handler needs from the driver (drivers.base.Hypervisor)."""

    def console_log_path(self, instance_uuid: str) -> Path | None: ...

    async def require_vm(self, instance_uuid: str) -> None: ...


def rotated_files(path: Path) -> list[Path]:
    """Existing rotated copies, newest first: path.0, path.1, ..."""
    found = []
    for index in range(64):
        candidate = path.with_name(f"{path.name}.{index}")
        if not candidate.exists():
            break
        found.append(candidate)
    return found


def _blocks_backwards(handle: BinaryIO, size: int) -> Iterator[bytes]:
    position = size
    while position > 0:
        length = min(BLOCK, position)
        position -= length
        handle.seek(position)
        yield handle.read(length)


def _newest_first(current: BinaryIO, size: int, path: Path, opened: list[BinaryIO]) -> Iterator[tuple[BinaryIO, int]]:
    """The current file, then the rotated ones (opened only when reached; closed by the caller)."""
    yield current, size
    for older in rotated_files(path):
        try:
            handle = open(older, "rb")
        except FileNotFoundError:
            return
        opened.append(handle)
        yield handle, os.fstat(handle.fileno()).st_size


def last_lines(current: BinaryIO, path: Path, count: int) -> tuple[list[bytes], int]:
    """The last `count` lines (without line endings) of the log whose current file is open as
    `current`, continuing into rotated files; and the offset in `current` they end at.

    As with `tail -n`, a final line without its newline counts as a line.
    """
    size = os.fstat(current.fileno()).st_size
    if count <= 0:
        return [], size
    blocks: list[bytes] = []
    newlines = total = 0
    ends_with_newline: bool | None = None
    opened: list[BinaryIO] = []
    try:
        for handle, length in _newest_first(current, size, path, opened):
            for block in _blocks_backwards(handle, length):
                if ends_with_newline is None and block:
                    ends_with_newline = block.endswith(b"\n")
                blocks.append(block)
                newlines += block.count(b"\n")
                total += len(block)
                # enough once a newline precedes the first wanted line (which is then whole)
                if newlines >= count + (1 if ends_with_newline else 0) or total >= MAX_TAIL_BYTES:
                    break
            else:
                continue
            break
    finally:
        for handle in opened:
            handle.close()
    lines = b"".join(reversed(blocks)).split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    return [line.removesuffix(b"\r") for line in lines[-count:]], size


def _split_long(line: bytes) -> Iterator[bytes]:
    if len(line) <= MAX_LINE:
        yield line
        return
    for start in range(0, len(line), MAX_LINE):
        yield line[start:start + MAX_LINE]


def _utf8_cut(data: bytes) -> int:
    """Where to cut `data` so that no UTF-8 sequence is split (its incomplete tail stays)."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte & 0xC0 == 0x80:
            continue  # a continuation byte: look further back for the lead byte
        if byte & 0x80 == 0:
            return len(data)
        needed = 2 if byte & 0xE0 == 0xC0 else 3 if byte & 0xF0 == 0xE0 else 4
        return len(data) if back >= needed else len(data) - back
    return len(data)


class LogFollower:
    """New lines of a log file as they are written, across rotation and truncation."""

    def __init__(self, path: Path, handle: BinaryIO | None, offset: int, *, poll_interval: float = 0.2,
                 partial_after: float = 0.5, logger: logging.Logger | None = None) -> None:
        self.path = path
        self._handle = handle
        self._offset = offset
        self.poll_interval = poll_interval
        self.partial_after = partial_after
        self._pending = b""
        self._pending_since = 0.0
        self._log = logger or logging.getLogger("herdsman.streams.logs")

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def _read_available(self) -> bytes:
        if self._handle is None:
            return b""
        self._handle.seek(self._offset)
        data = self._handle.read(1 << 18)
        self._offset += len(data)
        return data

    def _switch_if_replaced(self) -> bool:
        """Move to the next file after a rotation or truncation; True when it did."""
        try:
            stat = os.stat(self.path)
        except FileNotFoundError:
            return False  # between virtlogd's rename and create, or the VM is gone
        if self._handle is None:
            self._open(self.path, 0)
            return True
        mine = os.fstat(self._handle.fileno())
        if (mine.st_dev, mine.st_ino) == (stat.st_dev, stat.st_ino):
            if stat.st_size < self._offset:
                self._log.info("log truncated, reading it from the start", extra={"path": str(self.path)})
                self._offset = 0
                return True
            return False
        if self._read_ahead():
            return True  # the old file still had bytes: send them first
        successor = self._successor(mine.st_ino)
        self._log.info("log rotated, continuing with the next file", extra={"path": str(successor)})
        self.close()
        self._open(successor, 0)
        return True

    def _read_ahead(self) -> bool:
        assert self._handle is not None
        return os.fstat(self._handle.fileno()).st_size > self._offset

    def _successor(self, inode: int) -> Path:
        """The file written after the one with `inode`: chronological order is .N ... .0, current."""
        chain = list(reversed(rotated_files(self.path))) + [self.path]
        for index, candidate in enumerate(chain[:-1]):
            with contextlib.suppress(FileNotFoundError):
                if os.stat(candidate).st_ino == inode:
                    return chain[index + 1]
        return self.path

    def _open(self, path: Path, offset: int) -> None:
        try:
            self._handle = open(path, "rb")
        except FileNotFoundError:
            self._handle = None
        self._offset = offset

    def _split(self, data: bytes) -> list[bytes]:
        lines = (self._pending + data).split(b"\n")
        rest = lines.pop()
        if lines or not self._pending:  # a new unfinished line starts now
            self._pending_since = time.monotonic()
        self._pending = rest
        if len(self._pending) > MAX_LINE:
            lines.append(self._pending)
            self._pending = b""
        return [piece for line in lines for piece in _split_long(line.removesuffix(b"\r"))]

    def _flush_partial(self) -> list[bytes]:
        if not self._pending or time.monotonic() - self._pending_since < self.partial_after:
            return []
        cut = _utf8_cut(self._pending)
        if cut == 0:
            return []
        out, self._pending = self._pending[:cut], self._pending[cut:]
        self._pending_since = time.monotonic()
        return [out]

    async def lines(self) -> AsyncIterator[bytes]:
        while True:
            data = self._read_available()
            if data:
                for line in self._split(data):
                    yield line
                continue
            if self._switch_if_replaced():
                continue
            for line in self._flush_partial():
                yield line
            await asyncio.sleep(self.poll_interval)


def _int(payload: dict[str, Any], key: str, default: int) -> int:
    value = payload.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_LINES:
        raise ValueError(f"{key} must be a whole number from 0 to {MAX_LINES}")
    return value


def _bool(payload: dict[str, Any], key: str, default: bool) -> bool:
    value = payload.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ValueError(f"{key} must be true or false")
    return value


class LogsHandler:
    """Stream handler for kind "logs"."""

    def __init__(self, driver: LogSource, *, poll_interval: float = 0.2, partial_after: float = 0.5,
                 gone_check_interval: float = 5.0, logger: logging.Logger | None = None) -> None:
        self.driver = driver
        self.poll_interval = poll_interval
        self.partial_after = partial_after
        self.gone_check_interval = gone_check_interval
        self._log = logger or logging.getLogger("herdsman.streams.logs")

    async def __call__(self, ws: ServerConnection, claims: Claims) -> None:
        try:
            count = _int(claims.payload, "Lines", DEFAULT_LINES)
            follow = _bool(claims.payload, "Follow", True)
        except ValueError as exc:
            await close_with(ws, CLOSE_POLICY, f"logs: {exc}")
            return
        try:
            await self.driver.require_vm(claims.instance)
        except DriverError as exc:  # not on this host, libvirt away: the reason goes to the client
            await close_with(ws, CLOSE_UNAVAILABLE, str(exc))
            return
        path = self.driver.console_log_path(claims.instance)
        if path is None:
            await close_with(ws, CLOSE_UNAVAILABLE, "this VM keeps no serial log (its logConfig driver is none)")
            return
        reader = asyncio.create_task(_drain_client(ws))
        streamer = asyncio.create_task(self._stream(ws, claims.instance, path, count, follow))
        try:
            await asyncio.wait({reader, streamer}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (reader, streamer):
                task.cancel()
            await asyncio.gather(reader, streamer, return_exceptions=True)
        if streamer.cancelled():
            return  # the client went away
        error = streamer.exception()
        if error is not None:
            raise error
        await ws.close()

    async def _stream(self, ws: ServerConnection, instance: str, path: Path, count: int, follow: bool) -> None:
        try:
            handle: BinaryIO | None = open(path, "rb")
        except FileNotFoundError:
            handle = None  # not written yet (never started, or logConfig none)
        try:
            offset = 0
            if handle is not None:
                lines, offset = await asyncio.to_thread(last_lines, handle, path, count)
                await _send_lines(ws, _each(lines))
            if not follow:
                return
            follower = LogFollower(path, handle, offset, poll_interval=self.poll_interval,
                                   partial_after=self.partial_after, logger=self._log)
            handle = None  # the follower owns it now
            await self._follow(ws, follower, instance)
        finally:
            if handle is not None:
                handle.close()

    async def _follow(self, ws: ServerConnection, follower: LogFollower, instance: str) -> None:
        sending = asyncio.create_task(_send_lines(ws, follower.lines()))
        watcher = asyncio.create_task(self._until_gone(instance, follower.path))
        try:
            await asyncio.wait({sending, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (sending, watcher):
                task.cancel()
            await asyncio.gather(sending, watcher, return_exceptions=True)
            follower.close()
        if not sending.cancelled() and sending.exception() is not None:
            raise sending.exception()  # type: ignore[misc]

    async def _until_gone(self, instance: str, path: Path) -> None:
        """Returns once the VM and its log are gone (purged), which ends a follow."""
        while True:
            await asyncio.sleep(self.gone_check_interval)
            if path.exists():
                continue
            try:
                await self.driver.require_vm(instance)
            except NotFound:
                return
            except Exception:  # libvirt away for a moment: keep following
                continue


async def _send_lines(ws: ServerConnection, lines: AsyncIterator[bytes]) -> None:
    """Send each line as one "00 " message; every 256 lines let the loop run other work, since
    `send` only suspends when the connection's buffer is full."""
    sent = 0
    async for line in lines:
        await ws.send(PREFIX + line.decode(errors="replace"))
        sent += 1
        if sent % 256 == 0:
            await asyncio.sleep(0)


async def _each(lines: list[bytes]) -> AsyncIterator[bytes]:
    for line in lines:
        for piece in _split_long(line):
            yield piece


async def _drain_client(ws: ServerConnection) -> None:
    """Read and drop what the client sends; returns when it closes."""
    async for _ in ws:
        pass
