"""Connections to destination libvirtds, kept between migrations, and the destination's
herdsman host uuid check.

Opened with libvirt's client keepalive off, as the agent's own connection (connection.py); a
connection that broke is replaced on next use (and during a migration by link.py). Every call
is blocking and runs on the driver's worker pool through `blocking`.
"""

from __future__ import annotations

import asyncio
import posixpath
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import libvirt

from drivers.base import DriverError
from drivers.libvirt.migration import volumes

OPEN_TIMEOUT = 30.0
Blocking = Callable[..., Awaitable[Any]]


class Destinations:
    def __init__(self, blocking: Blocking) -> None:
        self._blocking = blocking
        self._conns: dict[str, libvirt.virConnect] = {}

    async def get(self, uri: str) -> libvirt.virConnect:
        """The cached connection to `uri` if it is alive, else a new one (DriverError if none)."""
        conn = self._conns.get(uri)
        if conn is not None:
            try:
                if await self._blocking(conn.isAlive, timeout=OPEN_TIMEOUT):
                    return conn
            except (libvirt.libvirtError, DriverError):
                pass
            self.drop(uri)
        try:
            conn = await self._blocking(lambda: open_destination(uri), timeout=OPEN_TIMEOUT)
        except (libvirt.libvirtError, DriverError) as exc:
            raise DriverError(f"cannot reach the destination's libvirt at {uri}: {message(exc)}") from None
        self._conns[uri] = conn
        return conn

    def keep(self, uri: str, conn: libvirt.virConnect | None) -> None:
        """After a migration: the connection it ended with (a new one if the first broke)."""
        if conn is not None and self._conns.get(uri) is not conn:
            self.drop(uri)
            self._conns[uri] = conn

    def drop(self, uri: str) -> None:
        conn = self._conns.pop(uri, None)
        if conn is not None:
            asyncio.get_running_loop().run_in_executor(None, close_quietly, conn)

    def close(self) -> None:
        for uri in list(self._conns):
            self.drop(uri)

    async def check_host_uuid(self, dst: libvirt.virConnect, expected: str, uri: str, state_dir: Path) -> None:
        """The destination's herdsman host uuid (`<state dir>/host-uuid` there, read over its
        libvirt) must be the one the controller named."""
        path = str(state_dir / "host-uuid")
        try:
            found = await self._blocking(lambda: read_small_file(dst, path))
        except (libvirt.libvirtError, DriverError) as exc:
            raise DriverError(f"cannot read the destination's host uuid ({path} at {uri}): {message(exc)}") from None
        if found is None:
            raise DriverError(f"{uri} runs no herdsman agent with this state dir ({path} is missing there)")
        if found.strip() != expected:
            raise DriverError(f"{uri} is host {found.strip()}, not {expected} as asked")


def open_destination(uri: str) -> libvirt.virConnect:
    conn = libvirt.open(uri)
    try:
        conn.setKeepAlive(-1, 0)  # off, as for the agent's own connection (connection.py)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() != libvirt.VIR_ERR_NO_SUPPORT:
            conn.close()
            raise
    return conn


def close_quietly(conn: libvirt.virConnect) -> None:
    try:
        conn.close()
    except libvirt.libvirtError:
        pass


def read_small_file(conn: libvirt.virConnect, path: str, limit: int = 4096) -> str | None:
    folder, name = posixpath.split(path)
    with volumes.folder_pool(conn, folder) as pool:
        vol = volumes.find(pool, name)
        if vol is None:
            return None
        size = min(volumes.facts(vol).physical, limit)
        return volumes.read_bytes(conn, vol, size).decode(errors="replace")


def message(exc: BaseException) -> str:
    if isinstance(exc, libvirt.libvirtError):
        return exc.get_error_message() or str(exc)
    return str(exc)
