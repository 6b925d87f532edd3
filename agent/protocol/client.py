"""The agent's connection to the controller: event subscription and reply publishing.

Events arrive on one long-lived websocket (`GET {CATTLE_URL}/subscribe`); replies go back as
HTTP POSTs (`{CATTLE_URL}/publish`), cattle-protocol.md §1. The controller restarts, networks
partition and peers die silently, so the subscription is a loop that never gives up: every
failure is logged and followed by a jittered, capped backoff, and a peer that stops answering
websocket pings is dropped instead of being waited on forever.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import random
from collections.abc import Awaitable, Callable, Sequence
from typing import Any
from urllib.parse import urlencode, urlsplit, urlunsplit

import httpx
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.protocol import State

POST_CONCURRENCY = 8

__all__ = ["ControllerClient", "PublishError", "basic_auth"]

_AUTH_STATUSES = (401, 403)
_PUBLISH_ATTEMPTS = 4
_PUBLISH_BACKOFF = 0.2
_MAX_ERROR_BODY = 2000


class PublishError(RuntimeError):
    """The controller did not accept a POST (after retrying transient failures)."""

    def __init__(self, message: str, status: int | None = None, body: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.body = body


class ControllerClient:
    """Subscribes to controller events and publishes replies, with Basic auth on both."""

    def __init__(
        self,
        url: str,
        access_key: str,
        secret_key: str,
        *,
        event_names: Sequence[str],
        max_frame_bytes: int = 64 << 20,
        max_transport_bytes: int | None = None,
        ping_interval: float = 5.0,
        ping_timeout: float = 15.0,
        backoff_initial: float = 0.5,
        backoff_cap: float = 30.0,
        stable_after: float = 30.0,
        publish_timeout: float = 10.0,
        logger: logging.Logger | None = None,
    ) -> None:
        """`max_frame_bytes` is what the caller's `parse_frame` accepts. Larger frames are still
        handed over (up to `max_transport_bytes`, default 4x) so the caller can send an error
        reply; a frame beyond that drops the connection. A connection that stayed up for
        `stable_after` seconds resets the backoff."""
        self.base_url = _base_url(url)
        if ":" in access_key:
            raise ValueError("access key must not contain ':' (HTTP Basic auth)")
        if not event_names:
            raise ValueError("event_names must name at least one event")
        self._auth_header = basic_auth(access_key, secret_key)
        self.event_names = list(event_names)
        self.max_frame_bytes = max_frame_bytes
        self.max_transport_bytes = max_transport_bytes or 4 * max_frame_bytes
        self._ping_interval = ping_interval
        self._ping_timeout = ping_timeout
        self._backoff_initial = backoff_initial
        self._backoff_cap = backoff_cap
        self._stable_after = stable_after
        self._publish_timeout = publish_timeout
        self._log = logger or logging.getLogger("herdsman.protocol")
        self._ws: ClientConnection | None = None
        self._http: httpx.AsyncClient | None = None
        # A few connections, reused: past that, httpx's pool bookkeeping grows with the queue and
        # a burst of 200 replies costs more in queueing than in sending (bench/README.md).
        self._posting = asyncio.Semaphore(POST_CONCURRENCY)
        self._running = False
        self._closed = False
        #: connection attempts and successful subscriptions since start (more than one: reconnects)
        self.connection_attempts = 0
        self.subscriptions = 0
        self._stop = asyncio.Event()

    # -- subscription ---------------------------------------------------------------------

    @property
    def subscribe_url(self) -> str:
        parts = urlsplit(self.base_url)
        scheme = "wss" if parts.scheme == "https" else "ws"
        query = urlencode([("eventNames", name) for name in self.event_names])
        if parts.query:
            query = f"{parts.query}&{query}"
        return urlunsplit((scheme, parts.netloc, parts.path + "/subscribe", query, ""))

    @property
    def connected(self) -> bool:
        return self._ws is not None and self._ws.state is State.OPEN

    async def run(
        self,
        on_frame: Callable[[str], Awaitable[None]],
        on_connected: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """Stay subscribed until cancelled or `aclose()`d; never raises because of the peer.

        Frames are handed to `on_frame` one at a time, in order; it must return quickly (the
        caller schedules the real work), because the reader also keeps the keepalive flowing.
        `on_connected` runs as its own task after each subscribe and is cancelled if that
        connection ends first.
        """
        if self._running:
            raise RuntimeError("ControllerClient.run() is already running")
        self._running = True
        attempt = 0
        try:
            while not self._closed:
                self._log.info(
                    "connecting to controller",
                    extra={"url": _redact(self.subscribe_url), "attempt": attempt + 1},
                )
                auth_failed = False
                uptime = 0.0
                self.connection_attempts += 1
                try:
                    uptime = await self._session(on_frame, on_connected)
                except InvalidStatus as exc:
                    status = exc.response.status_code
                    auth_failed = status in _AUTH_STATUSES
                    if auth_failed:
                        self._log.error(
                            "controller rejected the agent credentials",
                            extra={"url": _redact(self.subscribe_url), "status": status},
                        )
                    else:
                        self._log.warning(
                            "controller refused the subscription",
                            extra={"url": _redact(self.subscribe_url), "status": status},
                        )
                except Exception as exc:  # any failure means "retry later"
                    self._log.warning(
                        "controller connection failed",
                        extra={"url": _redact(self.subscribe_url), "error": _describe(exc)},
                    )
                if self._closed:
                    break
                if uptime >= self._stable_after:
                    attempt = 0
                delay = self._backoff_cap if auth_failed else self._backoff(attempt)
                attempt += 1
                self._log.info(
                    "reconnecting to controller after backoff",
                    extra={"delay": round(delay, 3), "attempt": attempt + 1,
                           "uptime": round(uptime, 3)},
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), timeout=delay)
        finally:
            self._running = False

    def _backoff(self, attempt: int) -> float:
        """Full jitter: uniform over [0, min(cap, initial * 2^attempt)]."""
        ceiling = min(self._backoff_cap, self._backoff_initial * (2 ** min(attempt, 32)))
        return random.uniform(0.0, ceiling)

    async def _session(
        self,
        on_frame: Callable[[str], Awaitable[None]],
        on_connected: Callable[[], Awaitable[None]] | None,
    ) -> float:
        """One subscription, from handshake to close; returns how long it stayed up."""
        loop = asyncio.get_running_loop()
        ws = await connect(
            self.subscribe_url,
            additional_headers={"Authorization": self._auth_header},
            user_agent_header="herdsman",
            # A controller that accepts TCP but never answers the upgrade is as dead as one
            # that stops answering pings: both are bounded by the ping timeout.
            open_timeout=self._ping_timeout,
            ping_interval=None,  # keepalive is ours: a dead peer must be aborted, not closed
            ping_timeout=None,
            close_timeout=min(self._ping_timeout, 5.0),
            max_size=self.max_transport_bytes,
        )
        if self._closed:  # aclose() ran during the handshake
            await ws.close()
            return 0.0
        started = loop.time()
        self._ws = ws
        self.subscriptions += 1
        self._log.info(
            "subscribed to controller events",
            extra={"url": _redact(self.subscribe_url), "events": self.event_names},
        )
        keepalive = asyncio.create_task(self._keepalive(ws), name="controller-keepalive")
        hook = (asyncio.create_task(self._run_hook(on_connected), name="controller-connected")
                if on_connected is not None else None)
        try:
            await self._read(ws, on_frame)
        finally:
            keepalive.cancel()
            if hook is not None:
                hook.cancel()
            self._ws = None
            if ws.state is not State.CLOSED:
                try:
                    await asyncio.wait_for(ws.close(), timeout=min(self._ping_timeout, 5.0))
                except (TimeoutError, OSError):
                    ws.transport.abort()
        uptime = loop.time() - started
        self._log.log(
            logging.INFO if self._closed else logging.WARNING,
            "controller connection closed",
            extra={"code": ws.close_code, "reason": ws.close_reason, "uptime": round(uptime, 3)},
        )
        return uptime

    async def _read(self, ws: ClientConnection, on_frame: Callable[[str], Awaitable[None]]) -> None:
        try:
            async for message in ws:
                if isinstance(message, bytes):
                    try:
                        message = message.decode("utf-8")
                    except UnicodeDecodeError:
                        self._log.warning("dropped a binary frame that is not UTF-8",
                                          extra={"size": len(message)})
                        continue
                try:
                    await on_frame(message)
                except Exception:  # one bad frame must not end the subscription
                    self._log.exception("frame handler failed", extra={"size": len(message)})
        except ConnectionClosed:
            pass  # logged by the caller with the close code

    async def _keepalive(self, ws: ClientConnection) -> None:
        """Ping every interval; abort the socket when a pong is late (no close handshake:
        a dead peer would not answer that either)."""
        try:
            while True:
                await asyncio.sleep(self._ping_interval)
                try:
                    async with asyncio.timeout(self._ping_timeout):
                        pong = await ws.ping()
                        await pong
                except TimeoutError:
                    self._log.warning(
                        "controller did not answer a ping in time; dropping the connection",
                        extra={"ping_timeout": self._ping_timeout},
                    )
                    ws.transport.abort()
                    return
        except ConnectionClosed:
            return

    async def _run_hook(self, hook: Callable[[], Awaitable[None]]) -> None:
        try:
            await hook()
        except asyncio.CancelledError:
            raise
        except Exception:  # reported, the subscription stays up
            self._log.exception("on_connected hook failed")

    # -- publishing -----------------------------------------------------------------------

    async def publish(self, reply: dict[str, Any]) -> None:
        """POST a reply event to `/publish` (expects 201)."""
        await self._post("/publish", reply)

    async def post_container_event(self, event: dict[str, Any]) -> None:
        """POST a host-side state change to `/containerevents` (expects 201)."""
        await self._post("/containerevents", event)

    async def _post(self, path: str, body: dict[str, Any]) -> None:
        """Retry connect errors, timeouts and 5xx a few times; refuse 4xx at once (a resend
        would be refused the same way). A duplicate reply is harmless: Cattle keeps the first."""
        if self._closed:
            raise PublishError(f"POST {path}: client is closed")
        content = json.dumps(body, separators=(",", ":")).encode("utf-8")
        url = self.base_url + path
        failure = ""
        status: int | None = None
        text = ""
        for attempt in range(_PUBLISH_ATTEMPTS):
            if attempt:
                backoff = _PUBLISH_BACKOFF * (2 ** (attempt - 1))
                await asyncio.sleep(backoff * random.uniform(0.5, 1.5))
            try:
                async with self._posting:
                    response = await self._client().post(
                        url, content=content, headers={"Content-Type": "application/json"})
            except httpx.TransportError as exc:
                status, text, failure = None, "", _describe(exc)
                self._log.warning("POST to controller failed",
                                  extra={"path": path, "attempt": attempt + 1, "error": failure})
                continue
            if 200 <= response.status_code < 300:
                return
            status, text = response.status_code, response.text[:_MAX_ERROR_BODY]
            failure = f"HTTP {status}"
            if status < 500 and status != 429:
                break
            self._log.warning("controller answered a POST with an error",
                              extra={"path": path, "attempt": attempt + 1, "status": status})
        raise PublishError(f"POST {path} failed: {failure}: {text}".rstrip(": "), status, text)

    async def post_once(self, path: str, body: dict[str, Any], *,
                        authorization: str | None = None) -> tuple[int, str]:
        """One POST on the shared connections, no retry: (status, start of the body). For
        callers with a retry policy of their own (health reports); `authorization` replaces
        the agent's own credentials. Raises httpx.TransportError when nothing answered."""
        if self._closed:
            raise PublishError(f"POST {path}: client is closed")
        headers = {"Content-Type": "application/json"}
        if authorization is not None:
            headers["Authorization"] = authorization
        content = json.dumps(body, separators=(",", ":")).encode("utf-8")
        async with self._posting:
            response = await self._client().post(self.base_url + path, content=content, headers=headers)
        return response.status_code, response.text[:_MAX_ERROR_BODY]

    def _client(self) -> httpx.AsyncClient:
        if self._http is None:
            self._http = httpx.AsyncClient(
                headers={"Authorization": self._auth_header, "User-Agent": "herdsman"},
                timeout=httpx.Timeout(self._publish_timeout),
                limits=httpx.Limits(max_connections=POST_CONCURRENCY, max_keepalive_connections=POST_CONCURRENCY),
            )
        return self._http

    async def aclose(self) -> None:
        """Close the subscription (ending `run()`) and the HTTP client."""
        self._closed = True
        self._stop.set()
        ws, self._ws = self._ws, None
        if ws is not None:
            try:
                await asyncio.wait_for(ws.close(), timeout=min(self._ping_timeout, 5.0))
            except (TimeoutError, OSError):
                ws.transport.abort()
        if self._http is not None:
            await self._http.aclose()
            self._http = None


def basic_auth(access_key: str, secret_key: str) -> str:
    """The HTTP Basic `Authorization` value for an API key pair."""
    if ":" in access_key:
        raise ValueError("access key must not contain ':' (HTTP Basic auth)")
    return "Basic " + base64.b64encode(f"{access_key}:{secret_key}".encode()).decode("ascii")


def _base_url(url: str) -> str:
    """CATTLE_URL without a trailing `/` or `/schemas` (§1.1)."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"controller URL must be http(s)://host/...: {_redact(url)!r}")
    path = parts.path
    while True:
        trimmed = path.rstrip("/")
        if trimmed.endswith("/schemas"):
            trimmed = trimmed[: -len("/schemas")]
        if trimmed == path:
            break
        path = trimmed
    return urlunsplit((parts.scheme, parts.netloc, path, parts.query, ""))


def _redact(url: str) -> str:
    """The URL without any user:password part, for logs."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc="***@" + parts.netloc.rsplit("@", 1)[1]))


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
