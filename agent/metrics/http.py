"""A small HTTP/1.1 server for `GET /metrics` on the agent's event loop.

Prometheus sends one GET per scrape interval; this answers it and closes the connection. It is
deliberately small rather than a web framework the agent does not otherwise need: bounded
request heads (16 KiB, 10 s), at most a few connections at once, GET and HEAD only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from urllib.parse import urlsplit

from agent.config import parse_listen

Scrape = Callable[[], Awaitable[tuple[bytes, str]]]

MAX_HEAD = 16 << 10
HEAD_TIMEOUT = 10.0
MAX_CONNECTIONS = 8
_INDEX = b"herdsman metrics: /metrics\n"


class MetricsServer:
    def __init__(self, listen: str, scrape: Scrape, *, logger: logging.Logger | None = None) -> None:
        self.host, self._port = parse_listen(listen)
        self._scrape = scrape
        self._log = logger or logging.getLogger("herdsman.metrics")
        self._server: asyncio.Server | None = None
        self._slots = asyncio.Semaphore(MAX_CONNECTIONS)

    @property
    def port(self) -> int:
        """The bound port (the configured one, or the one the kernel picked for :0)."""
        if self._server is None:
            return self._port
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, self._port, limit=MAX_HEAD)
        self._log.info("metrics endpoint listening", extra={"url": f"http://{self.host or '*'}:{self.port}/metrics"})

    async def close(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
            await server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            if self._slots.locked():
                await _respond(writer, HTTPStatus.SERVICE_UNAVAILABLE, b"too many scrapes at once\n")
                return
            async with self._slots:
                await self._answer(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the scraper went away
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(HEAD_TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
        except (TimeoutError, asyncio.LimitOverrunError):
            await _respond(writer, HTTPStatus.BAD_REQUEST, b"request head too large or too slow\n")
            return
        request = parse_head(head)
        if request is None:
            await _respond(writer, HTTPStatus.BAD_REQUEST, b"not an HTTP/1.x request\n")
            return
        method, path = request
        if method not in ("GET", "HEAD"):
            await _respond(writer, HTTPStatus.METHOD_NOT_ALLOWED, b"GET or HEAD\n", extra={"Allow": "GET, HEAD"})
            return
        if path == "/":
            await _respond(writer, HTTPStatus.OK, _INDEX, head_only=method == "HEAD")
            return
        if path != "/metrics":
            await _respond(writer, HTTPStatus.NOT_FOUND, b"not found; metrics are at /metrics\n")
            return
        try:
            body, content_type = await self._scrape()
        except Exception:  # a bug must not end the agent: say so, and show the scraper an error
            self._log.exception("metrics scrape failed")
            await _respond(writer, HTTPStatus.INTERNAL_SERVER_ERROR, b"scrape failed; see the agent's log\n")
            return
        await _respond(writer, HTTPStatus.OK, body, content_type=content_type, head_only=method == "HEAD")


def parse_head(head: bytes) -> tuple[str, str] | None:
    """(method, path) of a request head, None when it is not HTTP/1.x. No header changes the
    answer, so none is read."""
    try:
        method, target, version = head.decode("latin-1").split("\r\n", 1)[0].split(" ")
    except ValueError:
        return None
    if not version.startswith("HTTP/1.") or not method.isalpha():
        return None
    return method, urlsplit(target).path


async def _respond(writer: asyncio.StreamWriter, status: HTTPStatus, body: bytes, *,
                   content_type: str = "text/plain; charset=utf-8", head_only: bool = False,
                   extra: dict[str, str] | None = None) -> None:
    fields = {"Content-Type": content_type, "Content-Length": str(len(body)), "Connection": "close", **(extra or {})}
    head = f"HTTP/1.1 {status.value} {status.phrase}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in fields.items())
    writer.write(head.encode("latin-1") + b"\r\n" + (b"" if head_only else body))
    await writer.drain()
