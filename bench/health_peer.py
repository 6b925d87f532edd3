"""The far side of the `health` benchmark, in a process of its own: the services the probes
check (TCP and HTTP listeners on 127.0.0.2-9, standing in for 1,000 guests) and the
controller double that takes the health reports.

Kept out of the probing process so their work is not charged to it (except what the kernel
does for loopback connections in the connecting process: see bench/README.md).

`python -m bench.health_peer` prints one line `READY {"url": ..., "tcp": [[host, port]...],
"http": [[host, port]...]}` and serves until SIGTERM.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.controller_double import ControllerDouble

HOSTS = [f"127.0.0.{n}" for n in range(2, 10)]
HEALTH_KEYS = ("bench-health", "bench-health-secret")
_RESPONSE = b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok"


class _Tcp(asyncio.Protocol):
    """Accepts and waits for the prober to reset the connection."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        pass


class _Http(asyncio.Protocol):
    """Answers the first request head with 200 and closes."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.head = b""

    def data_received(self, data: bytes) -> None:
        self.head += data
        if b"\r\n\r\n" in self.head:
            self.transport.write(_RESPONSE)
            self.transport.close()


async def serve() -> None:
    loop = asyncio.get_running_loop()
    controller = ControllerDouble()
    controller.health_keys = HEALTH_KEYS
    await controller.start()
    servers = []
    listening: dict[str, list[tuple[str, int]]] = {"tcp": [], "http": []}
    for host in HOSTS:
        for kind, protocol in (("tcp", _Tcp), ("http", _Http)):
            server = await loop.create_server(protocol, host, 0, backlog=4096)
            servers.append(server)
            listening[kind].append((host, server.sockets[0].getsockname()[1]))
    print("READY " + json.dumps({"url": controller.url, **listening}), flush=True)
    done = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, done.set)
    await done.wait()
    accepted = len(controller.service_events)
    for server in servers:
        server.close()
    await controller.stop()
    print("REPORTS " + json.dumps({"accepted": accepted}), flush=True)


if __name__ == "__main__":
    asyncio.run(serve())
