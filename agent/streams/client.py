"""A small client for the stream server: what `herdsman logs` and the tests use.

It speaks exactly what a Rancher UI or any websocket client would: the token in `?token=`
(or an `Authorization: Bearer` header), optionally the `binary` subprotocol. A refused
handshake becomes StreamDenied with the server's status and one-line reason.
"""

from __future__ import annotations

import contextlib
import ssl
from typing import Any, AsyncIterator
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosedOK, InvalidStatus


class StreamDenied(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"HTTP {status}: {reason}")
        self.status = status
        self.reason = reason


def with_token(url: str, token: str) -> str:
    """`url` with `token` set in its query string, properly encoded."""
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k != "token"]
    query.append(("token", token))
    return urlunsplit(parts._replace(query=urlencode(query)))


@contextlib.asynccontextmanager
async def open_stream(url: str, token: str | None, *, binary: bool = False, bearer: bool = False,
                      ssl_context: ssl.SSLContext | None = None, open_timeout: float = 10,
                      **options: Any) -> AsyncIterator[ClientConnection]:
    """Connect to a stream URL such as ws://host:9345/v1/logs/ with a token.

    `binary` offers the `binary` subprotocol; `bearer` sends the token as a header instead
    of in the URL. Extra options go to websockets' `connect` (ping_interval, max_queue...).
    """
    headers = {}
    if token is not None:
        if bearer:
            headers["Authorization"] = f"Bearer {token}"
        else:
            url = with_token(url, token)
    try:
        ws = await connect(url, additional_headers=headers, subprotocols=["binary"] if binary else None,  # type: ignore[list-item]
                           ssl=ssl_context, open_timeout=open_timeout, compression=None, **options)
    except InvalidStatus as exc:
        response = exc.response
        raise StreamDenied(response.status_code, (response.body or b"").decode(errors="replace").strip()) from None
    try:
        yield ws
    finally:
        await ws.close()


async def messages(ws: ClientConnection) -> AsyncIterator[str | bytes]:
    """Every message until the server closes the stream; an abnormal close raises ConnectionClosed."""
    while True:
        try:
            yield await ws.recv()
        except ConnectionClosedOK:
            return


@contextlib.asynccontextmanager
async def local_stream(driver: Any, config: Any, kind: str, handler: Any, payload: dict[str, Any], *,
                       binary: bool = False, ttl: float = 60) -> AsyncIterator[ClientConnection]:
    """The debug mode's path to a stream: the real StreamServer on 127.0.0.1:0 with one route,
    a token minted with this host's stream secret, and a client connected with it."""
    from agent.config import host_uuid, secret
    from agent.streams.auth import TokenVerifier, mint_local
    from agent.streams.server import PATHS, StreamServer

    host, key = host_uuid(config), secret(config, "streams")
    server = StreamServer("127.0.0.1:0", TokenVerifier(host, local_secret=key), {kind: handler})
    await server.start()
    try:
        token = mint_local(key, host, kind, payload, ttl=ttl)
        async with open_stream(f"ws://127.0.0.1:{server.port}{PATHS[kind]}", token, binary=binary) as ws:
            yield ws
    finally:
        await server.close()
