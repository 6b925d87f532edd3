"""The destination's libvirt connection, opened again when it broke during a migration.

The verdict and the clean-up read the destination after a migration that may have lasted
minutes. A connection that broke meanwhile (libvirtd drops a client that missed its keepalive
pings for 30 s; the destination's daemon restarted) says nothing about where the VM is, so a
call that fails on a dead connection is tried once more on a new one. A call that fails on a
live connection is a real answer and is raised.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

import libvirt

T = TypeVar("T")
_log = logging.getLogger("herdsman.migration")


class DestinationLink:
    def __init__(self, conn: libvirt.virConnect, reopen: Callable[[], libvirt.virConnect] | None = None) -> None:
        self.conn = conn
        self._reopen = reopen
        self.reopened = False

    def call(self, fn: Callable[[libvirt.virConnect], T]) -> T:
        """Blocking: `fn(connection)`, once more on a fresh connection if this one died."""
        conn = self.conn
        try:
            return fn(conn)
        except libvirt.libvirtError as exc:
            if self._reopen is None or _alive(conn):
                raise
            _log.info("the destination's connection broke; opening it again",
                      extra={"error": exc.get_error_message() or str(exc)})
        self.conn = self._reopen()
        self.reopened = True
        return fn(self.conn)


def _alive(conn: libvirt.virConnect) -> bool:
    try:
        return bool(conn.isAlive())
    except libvirt.libvirtError:
        return False
