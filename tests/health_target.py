"""A real TCP/HTTP service for health-check tests, on a free port of 127.0.0.1.

It answers the way a test tells it to (a status code, garbage, silence, a close), can be
stopped and started again on the same port (a service going down and coming back), and keeps
every request it got, byte for byte, so tests can check what a probe sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from dataclasses import dataclass, field


@dataclass
class Answer:
    """How the next requests are answered."""

    status: int | None = 200  # None: no answer at all (silence until the client gives up)
    raw: bytes | None = None  # exact bytes instead of a status line
    split: bool = False  # send the status line in two packets
    close_at_once: bool = False  # close after accepting, before reading anything


@dataclass
class CheckTarget:
    host: str = "127.0.0.1"
    answer: Answer = field(default_factory=Answer)
    requests: list[bytes] = field(default_factory=list)
    connections: int = 0
    port: int = 0
    _server: asyncio.Server | None = None
    _writers: set[asyncio.StreamWriter] = field(default_factory=set)

    async def start(self) -> CheckTarget:
        sock = socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        self.port = sock.getsockname()[1]
        self._server = await asyncio.start_server(self._serve, sock=sock, backlog=256)
        return self

    async def stop(self) -> None:
        """Stop listening and drop open connections: probes now get 'connection refused'."""
        if self._server is not None:
            self._server.close()
            for writer in list(self._writers):
                writer.transport.abort()
            await self._server.wait_closed()
            self._server = None

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.add(writer)
        answer = self.answer
        try:
            if answer.close_at_once:
                return
            head = b""
            with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
                head = await reader.readuntil(b"\r\n\r\n")
            if not head:
                return  # a TCP check: connected and closed (reset) without a word
            self.requests.append(head)
            if answer.raw is not None:
                writer.write(answer.raw)
            elif answer.status is None:
                await asyncio.sleep(3600)
            else:
                line = f"HTTP/1.0 {answer.status} Whatever\r\nContent-Length: 0\r\n\r\n".encode()
                if answer.split:
                    writer.write(line[:7])
                    await writer.drain()
                    await asyncio.sleep(0.05)
                    line = line[7:]
                writer.write(line)
            with contextlib.suppress(ConnectionError):
                await writer.drain()
        finally:
            self._writers.discard(writer)
            writer.transport.abort()


def closed_port() -> int:
    """A port on 127.0.0.1 with nothing listening (bound once, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Blackhole:
    """A listener whose accept queue is full, so new connections are never completed: the
    way a guest that drops packets looks to a probe (connect times out)."""

    def __init__(self) -> None:
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(0)
        self.port = self.listener.getsockname()[1]
        self.fillers: list[socket.socket] = []
        for _ in range(4):  # backlog 0 still queues one or two; fill them
            filler = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                filler.connect(("127.0.0.1", self.port))
            self.fillers.append(filler)

    def close(self) -> None:
        for sock in (*self.fillers, self.listener):
            sock.close()
