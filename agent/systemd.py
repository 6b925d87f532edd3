"""systemd's sd_notify protocol, in-house: readiness, status text and the watchdog.

The protocol is one datagram of ``KEY=value`` lines sent to the ``AF_UNIX`` socket named by
``NOTIFY_SOCKET``; a library dependency would buy nothing. Outside systemd there is no socket
and every call is a silent no-op, so callers never need to check where they run.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import socket
from collections.abc import Mapping

log = logging.getLogger(__name__)

_KEY = re.compile(r"[A-Z][A-Z0-9_]*\Z")
#: State changes the manager must hear: a dropped READY=1 fails a Type=notify unit's start. The
#: manager's queue holds only net.unix.max_dgram_qlen (10) datagrams, and our socket never blocks,
#: so one sent while it is full is sent again from the loop instead of dropped.
_MUST_ARRIVE = frozenset({"READY", "STOPPING", "RELOADING"})
RESEND_EVERY = 0.05
RESEND_FOR = 30.0


class Notifier:
    """Sends state changes to the service manager; never raises."""

    def __init__(self, address: str | None = None, watchdog_interval: float | None = None) -> None:
        self._address = address
        self._sock: socket.socket | None = None
        self._failing = False
        if address is not None:
            try:
                # Non-blocking: a stuck manager must never stall the event loop that calls us.
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)
            except OSError as exc:
                log.warning("cannot create the sd_notify socket: %s; not notifying", exc)
        self.enabled: bool = self._sock is not None
        self.watchdog_interval: float | None = watchdog_interval if self.enabled else None

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] = os.environ) -> Notifier:
        """Read ``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and ``WATCHDOG_PID`` as systemd sets them."""
        raw = environ.get("NOTIFY_SOCKET", "")
        if raw.startswith("@"):  # abstract namespace: the name starts with a NUL byte
            address: str | None = "\0" + raw[1:]
        elif raw.startswith("/"):
            address = raw
        else:
            if raw:  # e.g. systemd >= 253's "vsock:" for VMs, which a host agent never sees
                log.warning("unsupported NOTIFY_SOCKET address %r; not notifying", raw)
            return cls()
        return cls(address, _watchdog_interval(environ))

    def notify(self, **fields: str) -> None:
        """Send ``KEY=value`` lines as one datagram. Newlines in a value would forge further
        fields, so they become spaces; a failed send is logged, never raised."""
        if self._sock is None or self._address is None or not fields:
            return
        lines = []
        for key, value in fields.items():
            if not _KEY.match(key):
                log.warning("invalid sd_notify field name %r dropped", key)
                continue
            lines.append(f"{key}={_one_line(str(value))}")
        payload = "\n".join(lines).encode()
        try:
            self._sock.sendto(payload, self._address)
        except BlockingIOError as exc:  # the manager's queue is full
            if not (_MUST_ARRIVE.intersection(fields) and self._resend_later(payload)):
                self._failed(exc)
        except OSError as exc:
            self._failed(exc)
        else:
            self._sent()

    def _failed(self, exc: OSError) -> None:
        if not self._failing:  # once per outage: a watchdog ping every few seconds adds up
            log.warning("sd_notify to %r failed: %s", self._address, exc)
        self._failing = True

    def _sent(self) -> None:
        if self._failing:
            log.info("sd_notify works again")
        self._failing = False

    def _resend_later(self, payload: bytes) -> bool:
        """Send `payload` again every RESEND_EVERY s for up to RESEND_FOR s, from the running
        loop; False without one."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return False
        deadline = loop.time() + RESEND_FOR

        def again() -> None:
            if self._sock is None or self._address is None:
                return
            try:
                self._sock.sendto(payload, self._address)
            except BlockingIOError as exc:
                if loop.time() < deadline:
                    loop.call_later(RESEND_EVERY, again)
                else:
                    self._failed(exc)
            except OSError as exc:
                self._failed(exc)
            else:
                self._sent()

        loop.call_later(RESEND_EVERY, again)
        return True

    def ready(self, status: str | None = None) -> None:
        if status is None:
            self.notify(READY="1")
        else:
            self.notify(READY="1", STATUS=status)

    def status(self, text: str) -> None:
        self.notify(STATUS=text)

    def stopping(self) -> None:
        self.notify(STOPPING="1")

    def watchdog(self) -> None:
        self.notify(WATCHDOG="1")

    async def run_watchdog(self) -> None:
        """Ping the watchdog forever from the event loop itself (not a thread), so a blocked
        loop stops the pings and systemd restarts the agent. Returns at once without one."""
        interval = self.watchdog_interval
        if interval is None:
            return
        while True:
            await asyncio.sleep(interval)
            self.watchdog()

    def close(self) -> None:
        """Release the socket; later calls are no-ops."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self.enabled, self.watchdog_interval = False, None


def _one_line(value: str) -> str:
    return value.replace("\r", " ").replace("\n", " ")


def _watchdog_interval(environ: Mapping[str, str]) -> float | None:
    """Half of ``WATCHDOG_USEC`` (systemd's advice), or None when the watchdog is off or
    meant for another process (``WATCHDOG_PID`` names the pid that must ping)."""
    try:
        usec = int(environ.get("WATCHDOG_USEC", "0"))
        pid = environ.get("WATCHDOG_PID")
        if pid is not None and int(pid) != os.getpid():
            return None
    except ValueError:
        log.warning("malformed WATCHDOG_USEC/WATCHDOG_PID; watchdog off")
        return None
    return usec / 2 / 1_000_000 if usec > 0 else None
