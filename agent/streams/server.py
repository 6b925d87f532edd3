"""The stream server: one websocket listener for console, exec, logs and proxy.

Why it is built this way:
- The token is checked DURING the opening handshake (websockets' `process_request`): a client
  without a valid token gets a plain HTTP 401/403/404 with a one-line reason and never a
  websocket, so no handler runs and not one byte of a VM reaches it. Each refusal is logged
  with the reason, the remote address and the path (never the token).
- Cattle's paths (cattle-protocol.md §5): /v1/console/, /v1/exec/, /v1/logs/,
  /v1/container-proxy/. A path may end in an instance uuid (/v1/exec/<uuid>); it must then be
  the token's, so a token for VM A can never be pointed at VM B.
- Keepalive pings every `ping_interval` seconds: idle consoles survive NAT and load balancers
  (KubeVirt #16981 lost them without pings), and a peer that stops answering is dropped.
- Bounded buffers: `write_limit` bytes of unsent data per connection and `max_queue` received
  frames. Handlers await `send`, so a client that stops reading stalls its own stream, not the
  agent's memory. A client that has read nothing for `stall_timeout` seconds while data waits
  is cut off: with a full buffer even a keepalive ping cannot be sent, so without this a
  vanished client could hold its stream (and the VM resource behind it) for good.
- Subprotocol `binary` when the client offers it (noVNC; raw console bytes), none otherwise;
  handlers read `ws.subprotocol` to choose binary frames or the Rancher UI's base64 text.
- No permessage-deflate: VNC and most stream data are already compact, and zlib state costs
  ~100 KiB per connection.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
import uuid as uuid_module
import weakref
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from http import HTTPStatus
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.typing import Subprotocol

from agent.config import parse_listen
from agent.streams.auth import KINDS, AuthError, Claims, TokenVerifier

#: websockets logs each raw request line (with its ?token=) at DEBUG: never below INFO here.
_WS_LOG = logging.getLogger("herdsman.streams.ws")
# A filter, not a level: the logger keeps following the configured level (quiet in the CLI)
# but never emits websockets' DEBUG lines, which include request lines with ?token=.
_WS_LOG.addFilter(lambda record: record.levelno >= logging.INFO)

Handler = Callable[[ServerConnection, Claims], Awaitable[None]]
#: Raises StreamRefused when the instance cannot be streamed (unknown VM, libvirt away).
InstanceCheck = Callable[[str], Awaitable[None]]

PATHS: dict[str, str] = {
    "console": "/v1/console/",
    "exec": "/v1/exec/",
    "logs": "/v1/logs/",
    "proxy": "/v1/container-proxy/",
}
BINARY = "binary"
#: Close codes handlers use: the peer behind the stream is unreachable / the request is refused.
CLOSE_UNAVAILABLE = 1011
CLOSE_POLICY = 1008
CLOSE_BAD_GATEWAY = 1014


class _Connection(ServerConnection):
    """Remembers since when writing has been paused (the client is not reading)."""

    paused_since: float | None = None

    def pause_writing(self) -> None:
        super().pause_writing()
        self.paused_since = time.monotonic()

    def resume_writing(self) -> None:
        super().resume_writing()
        self.paused_since = None


class StreamRefused(Exception):
    """A handshake refusal that is not about the token (e.g. 404 no such VM, 503 libvirt down)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def route_of(path: str) -> tuple[str, str | None] | None:
    """(kind, instance named in the path or None) for a stream path, None for anything else."""
    for kind, prefix in PATHS.items():
        if path == prefix.rstrip("/") or path == prefix:
            return kind, None
        if path.startswith(prefix):
            rest = path[len(prefix):].strip("/")
            if "/" in rest:
                return None
            return kind, rest or None
    return None


def token_of(request: Request, query: str) -> str:
    """`?token=` first (what the Rancher UI sends), else `Authorization: Bearer <token>`."""
    values = parse_qs(query).get("token")
    if values:
        return values[0]
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() == "bearer":
        return value.strip()
    return ""


class StreamServer:
    def __init__(self, listen: str, verifier: TokenVerifier, routes: dict[str, Handler], *,
                 ssl_context: ssl.SSLContext | None = None, logger: logging.Logger | None = None,
                 ping_interval: float = 20, write_limit: int = 1 << 20,
                 instance_check: InstanceCheck | None = None, max_queue: int = 16,
                 max_message: int = 1 << 20, stall_timeout: float = 60.0, close_timeout: float = 5.0) -> None:
        unknown = set(routes) - set(KINDS)
        if unknown:
            raise ValueError(f"unknown stream kinds: {', '.join(sorted(unknown))}")
        self.host, self._port = parse_listen(listen)
        self.verifier = verifier
        self.routes = dict(routes)
        self.ssl_context = ssl_context
        self.ping_interval = ping_interval
        self.write_limit = write_limit
        self.max_queue = max_queue
        self.max_message = max_message
        self.instance_check = instance_check
        self.stall_timeout = stall_timeout
        self.close_timeout = close_timeout
        self._log = logger or logging.getLogger("herdsman.streams")
        self._claims: weakref.WeakKeyDictionary[ServerConnection, Claims] = weakref.WeakKeyDictionary()
        self._server: Server | None = None
        #: streams opened and open now by kind, and handshakes refused by HTTP status (for metrics)
        self.opened: Counter[str] = Counter()
        self.active: Counter[str] = Counter()
        self.refused: Counter[int] = Counter()

    @property
    def port(self) -> int:
        """The bound port (the configured one, or the one the kernel picked for :0)."""
        if self._server is None:
            return self._port
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def running(self) -> bool:
        return self._server is not None

    async def start(self) -> None:
        self._server = await serve(
            self._serve, self.host, self._port,
            process_request=self._check_request, select_subprotocol=self._select_subprotocol,
            compression=None, ping_interval=self.ping_interval, ping_timeout=self.ping_interval,
            close_timeout=min(self.close_timeout, self.ping_interval), create_connection=_Connection,
            write_limit=self.write_limit, max_queue=self.max_queue, max_size=self.max_message,
            ssl=self.ssl_context, logger=_WS_LOG, server_header=None,
        )
        self._log.info("stream server listening", extra={"listen": f"{self.host or '*'}:{self.port}",
                                                         "tls": self.ssl_context is not None,
                                                         "kinds": sorted(self.routes)})

    async def close(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
            await server.wait_closed()

    # -- the handshake -------------------------------------------------------------------------
    @staticmethod
    def _select_subprotocol(_connection: ServerConnection, offered: Sequence[Subprotocol]) -> Subprotocol | None:
        return Subprotocol(BINARY) if BINARY in offered else None

    def _refuse(self, connection: ServerConnection, status: int, reason: str, path: str) -> Response:
        self.refused[status] += 1
        remote = connection.remote_address
        self._log.warning("stream refused", extra={"status": status, "reason": reason, "path": path,
                                                   "remote": f"{remote[0]}:{remote[1]}" if remote else None})
        response = connection.respond(HTTPStatus(status), reason + "\n")
        if status == 401:
            response.headers["WWW-Authenticate"] = 'Bearer realm="herdsman"'
        return response

    async def _check_request(self, connection: ServerConnection, request: Request) -> Response | None:
        parts = urlsplit(request.path)
        route = route_of(parts.path)
        if route is None or route[0] not in self.routes:
            known = ", ".join(PATHS[k] for k in sorted(self.routes))
            return self._refuse(connection, 404, f"no stream at {parts.path} (streams: {known})", parts.path)
        kind, named = route
        try:
            claims = self.verifier.verify(token_of(request, parts.query), kind)
            if named is not None and _canonical(named) != claims.instance:
                raise AuthError(403, f"token is for instance {claims.instance}, not {named}")
            if self.instance_check is not None:
                await self.instance_check(claims.instance)
        except (AuthError, StreamRefused) as exc:
            return self._refuse(connection, exc.status, exc.reason, parts.path)
        self._claims[connection] = claims
        return None

    # -- the stream ----------------------------------------------------------------------------
    async def _serve(self, ws: ServerConnection) -> None:
        claims = self._claims.pop(ws, None)
        if claims is None:  # cannot happen: the handshake stored them
            await ws.close(CLOSE_UNAVAILABLE, "no claims")
            return
        handler = self.routes[claims.kind]
        remote = ws.remote_address
        context = {"kind": claims.kind, "instance": claims.instance, "subject": claims.subject,
                   "remote": f"{remote[0]}:{remote[1]}" if remote else None, "subprotocol": ws.subprotocol}
        started = time.monotonic()
        self._log.info("stream opened", extra=context)
        self.opened[claims.kind] += 1
        self.active[claims.kind] += 1
        watchdog = asyncio.create_task(self._cut_when_stalled(ws, context))
        try:
            await handler(ws, claims)
        except ConnectionClosed:
            pass
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # one stream's failure never touches the others
            self._log.exception("stream handler failed", extra=context)
            await ws.close(CLOSE_UNAVAILABLE, _reason(str(exc) or type(exc).__name__))
        finally:
            self.active[claims.kind] -= 1
            watchdog.cancel()
            self._log.info("stream closed", extra={**context, "seconds": round(time.monotonic() - started, 3),
                                                   "code": ws.close_code})

    async def _cut_when_stalled(self, ws: ServerConnection, context: Mapping[str, object]) -> None:
        check = max(0.05, min(5.0, self.stall_timeout / 4))
        while True:
            await asyncio.sleep(check)
            since = getattr(ws, "paused_since", None)
            if since is not None and time.monotonic() - since > self.stall_timeout:
                self._log.warning("stream cut: the client has read nothing", extra={**context,
                                                                                    "seconds": self.stall_timeout})
                ws.transport.abort()
                return


def _canonical(value: str) -> str:
    try:
        return str(uuid_module.UUID(value))
    except ValueError:
        return value


def _reason(text: str) -> str:
    """A close reason fits in 123 bytes of UTF-8."""
    data = text.encode()[:120]
    return data.decode(errors="ignore")


async def close_with(ws: ServerConnection, code: int, reason: str) -> None:
    """Close a stream with a reason that fits the protocol's limit."""
    await ws.close(code, _reason(reason))
