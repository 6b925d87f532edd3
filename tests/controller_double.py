"""A real HTTP/websocket server on 127.0.0.1 that stands in for the Cattle controller in tests.

It speaks the agent-facing part of the protocol (cattle-protocol.md §1): `GET /v1` (the API
root, with Basic auth, as `herdsman check` asks it), `GET /v1/subscribe`
(Basic auth, websocket, optional keepalive `ping` events without replyTo),
`POST /v1/publish` (only `reply.*` names, like Cattle's PublishManager for agent accounts) and
`POST /v1/containerevents` and `POST /v1/serviceevents` (health reports: `service_event_answers`
makes it refuse the next ones with those statuses, as Cattle does while it creates its checker
rows; `container_event_answers` does the same for container events). Tests drive it with `request()` and read what the agent sent back.

`python -m tests.controller_double [--port N]` runs one in its own process (prints
`READY <url>`), for tests that need a peer which can be frozen with SIGSTOP.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import contextlib
import json
import random
import signal
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import WSMsgType, web

__all__ = ["ControllerDouble"]

_MAX_BODY = 256 << 20
_TRANSITIONING = (None, "yes", "no", "error")


@dataclass(eq=False)
class _Subscriber:
    ws: web.WebSocketResponse
    transport: asyncio.Transport | None
    event_names: list[str]
    keepalive: asyncio.Task[None] | None = field(default=None)
    peer: str | None = None  # the agent's address (tests with one agent per test host)


class ControllerDouble:
    """An in-process stand-in for Cattle's agent-facing API, on a random free port."""

    def __init__(self, access_key: str = "agent", secret_key: str = "secret", *,
                 keepalive_interval: float | None = None) -> None:
        self.access_key = access_key
        self.secret_key = secret_key
        self.keepalive_interval = keepalive_interval
        self.port: int | None = None
        self.host = "127.0.0.1"
        self.subscriptions: list[list[str]] = []
        self.replies: list[dict[str, Any]] = []
        self.container_events: list[dict[str, Any]] = []  # accepted ones
        self.container_event_answers: list[int] = []  # statuses for the next ones, then 201
        self.container_event_attempts: list[dict[str, Any]] = []  # every one received
        self.service_events: list[dict[str, Any]] = []  # accepted health reports
        self.service_event_attempts: list[tuple[float, int, dict[str, Any]]] = []  # (monotonic, status, body)
        self.service_event_answers: list[int] = []  # statuses for the next reports, then 201
        self.health_keys: tuple[str, str] | None = None  # the (delegate) key /serviceevents wants
        self.auth_failures: list[tuple[str, float]] = []  # (path, time.monotonic())
        self._subscribers: set[_Subscriber] = set()
        self._runner: web.AppRunner | None = None
        self._changed = asyncio.Condition()

    # -- lifecycle --------------------------------------------------------------------------

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("ControllerDouble is not started")
        return f"http://{self.host}:{self.port}/v1"

    @property
    def connected(self) -> int:
        """How many subscribers are connected right now."""
        return len(self._subscribers)

    async def start(self, port: int = 0, host: str | None = None) -> None:
        """Listen on `host` (default 127.0.0.1; agents in test hosts need the LAN's root address)."""
        self.host = host or self.host
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, port))
        except OSError:
            sock.close()
            raise
        app = web.Application(client_max_size=_MAX_BODY)
        app.router.add_get("/v1", self._api_root)
        app.router.add_get("/v1/subscribe", self._subscribe)
        app.router.add_post("/v1/publish", self._publish)
        app.router.add_post("/v1/containerevents", self._container_event)
        app.router.add_post("/v1/serviceevents", self._service_event)
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await runner.setup()
        await web.SockSite(runner, sock).start()
        self._runner = runner
        self.port = sock.getsockname()[1]

    async def stop(self) -> None:
        """Close every subscriber (going-away close, then abort) and stop listening."""
        subscribers = list(self._subscribers)
        if subscribers:
            await asyncio.gather(*(self._close(sub) for sub in subscribers),
                                 return_exceptions=True)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def restart(self, down_for: float = 0.0) -> None:
        """Stop, stay down for `down_for` seconds (connections are refused), start on the same
        port."""
        port = self.port
        await self.stop()
        await asyncio.sleep(down_for)
        await self.start(port or 0)

    async def kill_connections(self) -> None:
        """Abort every subscriber's TCP connection without a close handshake."""
        for sub in list(self._subscribers):
            if sub.transport is not None:
                sub.transport.abort()

    async def _close(self, sub: _Subscriber) -> None:
        with contextlib.suppress(TimeoutError, OSError, RuntimeError):
            await asyncio.wait_for(sub.ws.close(code=1001, message=b"server shutting down"), 1.0)
        if sub.transport is not None:
            sub.transport.abort()

    # -- sending events ---------------------------------------------------------------------

    def make_event(self, name: str, data: dict[str, Any] | None = None, *,
                   resource_type: str | None = None, resource_id: str | None = None,
                   event_id: str | None = None, **extra: Any) -> dict[str, Any]:
        """A request event as Cattle builds it (`extra` adds or overrides fields)."""
        event: dict[str, Any] = {
            "id": event_id or str(uuid.uuid4()),
            "name": name,
            "replyTo": f"reply.{random.getrandbits(63)}",
            "resourceType": resource_type,
            "resourceId": resource_id,
            "previousIds": None,
            "previousNames": None,
            "data": data if data is not None else {},
            "time": int(time.time() * 1000),
            "timeoutMillis": 15000,
            "transitioningProgress": None,
        }
        event.update(extra)
        return event

    async def send(self, event: dict[str, Any], *, to: str | None = None) -> int:
        """Send one event as a text frame to every subscriber (or those connected from address
        `to`, as Cattle sends a host's events to that host's agent); returns how many got it."""
        return await self.send_raw(json.dumps(event), to=to)

    async def send_raw(self, text: str | bytes, *, to: str | None = None) -> int:
        """Send a text frame with exactly this payload (bytes are not checked for UTF-8)."""
        payload = text.encode("utf-8") if isinstance(text, str) else text
        sent = 0
        for sub in list(self._subscribers):
            if to is not None and sub.peer != to:
                continue
            try:
                await sub.ws.send_frame(payload, WSMsgType.TEXT)
                sent += 1
            except (ConnectionError, RuntimeError):
                pass
        return sent

    async def request(self, name: str, data: dict[str, Any] | None = None, *,
                      resource_type: str | None = None, resource_id: str | None = None,
                      timeout: float = 30.0, event_id: str | None = None, to: str | None = None,
                      **extra: Any) -> dict[str, Any]:
        """Send a request and return its final reply (progress replies are kept aside)."""
        extra.setdefault("timeoutMillis", int(timeout * 1000))
        event = self.make_event(name, data, resource_type=resource_type,
                                resource_id=resource_id, event_id=event_id, **extra)
        if not await self.send(event, to=to):
            raise RuntimeError(f"no subscriber is connected to receive {name!r}")
        return await self.wait_reply(event, timeout)

    async def wait_reply(self, event: dict[str, Any], timeout: float = 30.0) -> dict[str, Any]:
        """The final reply (transitioning != "yes") to an event sent earlier."""
        def final() -> dict[str, Any] | None:
            return next((r for r in self.replies if _answers(r, event)
                         and r.get("transitioning") != "yes"), None)

        try:
            reply: dict[str, Any] = await self._wait_for(final, timeout)
            return reply
        except TimeoutError:
            progress = len(self.progress_replies(event.get("replyTo") or ""))
            raise TimeoutError(
                f"no final reply to {event.get('name')!r} (id {event.get('id')}, replyTo "
                f"{event.get('replyTo')}) within {timeout}s; {progress} progress replies, "
                f"{len(self.replies)} replies in all, {self.connected} subscribers connected"
            ) from None

    def progress_replies(self, reply_to: str) -> list[dict[str, Any]]:
        return [r for r in self.replies
                if r.get("name") == reply_to and r.get("transitioning") == "yes"]

    async def wait_subscribed(self, timeout: float = 10.0, count: int = 1) -> None:
        """Wait until `count` subscriptions in all have been accepted."""
        try:
            await self._wait_for(lambda: len(self.subscriptions) >= count or None, timeout)
        except TimeoutError:
            raise TimeoutError(f"subscription #{count} not made within {timeout}s "
                               f"({len(self.subscriptions)} so far, "
                               f"{len(self.auth_failures)} refused for bad credentials)") from None

    async def wait_peer(self, address: str, timeout: float = 60.0) -> None:
        """Wait until an agent connected from `address` is subscribed (again, after a cut link or
        a restart: its reconnect backoff is jittered up to 30 s)."""
        try:
            await self._wait_for(lambda: any(sub.peer == address for sub in self._subscribers) or None, timeout)
        except TimeoutError:
            raise TimeoutError(f"no agent from {address} subscribed within {timeout}s") from None

    async def wait_container_event(self, predicate: Callable[[dict[str, Any]], bool],
                                   timeout: float = 10.0) -> dict[str, Any]:
        try:
            found: dict[str, Any] = await self._wait_for(
                lambda: next((e for e in self.container_events if predicate(e)), None), timeout)
            return found
        except TimeoutError:
            raise TimeoutError(f"no matching container event within {timeout}s "
                               f"({len(self.container_events)} received)") from None

    async def _wait_for(self, probe: Callable[[], Any], timeout: float) -> Any:
        async with asyncio.timeout(timeout):
            async with self._changed:
                while (found := probe()) is None:
                    await self._changed.wait()
                return found

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    # -- HTTP handlers --------------------------------------------------------------------

    def _authorized(self, request: web.Request, keys: tuple[str, str] | None = None) -> bool:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        try:
            user, _, password = base64.b64decode(token, validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False
        access_key, secret_key = keys or (self.access_key, self.secret_key)
        ok = (scheme.lower() == "basic" and user == access_key
              and password == secret_key)
        if not ok:
            self.auth_failures.append((request.path, time.monotonic()))
        return ok

    @staticmethod
    def _unauthorized() -> web.Response:
        return web.json_response(
            {"type": "error", "status": 401, "code": "Unauthorized"}, status=401,
            headers={"WWW-Authenticate": 'Basic realm="Enter API access key and secret key '
                                         'as username and password"'})

    async def _api_root(self, request: web.Request) -> web.Response:
        """`GET /v1`: Cattle's API root (what `herdsman check` asks, with the agent's keys)."""
        if not self._authorized(request):
            return self._unauthorized()
        return web.json_response({"type": "apiVersion", "id": "v1", "links": {"self": str(request.url)}})

    async def _subscribe(self, request: web.Request) -> web.StreamResponse:
        if not self._authorized(request):
            await self._notify()
            return self._unauthorized()
        names = request.query.getall("eventNames", [])
        ws = web.WebSocketResponse(autoping=True, timeout=1.0)
        await ws.prepare(request)
        transport = request.transport
        sub = _Subscriber(ws, transport if isinstance(transport, asyncio.Transport) else None,
                          list(names), peer=request.remote)
        self._subscribers.add(sub)
        self.subscriptions.append(list(names))
        if self.keepalive_interval:
            sub.keepalive = asyncio.create_task(self._keepalive(sub, self.keepalive_interval))
        await self._notify()
        try:
            async for _ in ws:  # agents send nothing; aiohttp answers their pings here
                pass
        finally:
            self._subscribers.discard(sub)
            if sub.keepalive is not None:
                sub.keepalive.cancel()
            await self._notify()
        return ws

    async def _keepalive(self, sub: _Subscriber, interval: float) -> None:
        """Cattle's subscription pings: no replyTo, so agents must not answer them."""
        with contextlib.suppress(ConnectionError, RuntimeError):
            while not sub.ws.closed:
                ping = {"id": str(uuid.uuid4()), "name": "ping", "resourceType": "agent",
                        "time": int(time.time() * 1000)}
                await sub.ws.send_str(json.dumps(ping))
                await asyncio.sleep(interval)

    async def _json_body(self, request: web.Request) -> dict[str, Any] | web.Response:
        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError):
            return _error(400, "InvalidBodyContent", "body is not JSON")
        if not isinstance(body, dict):
            return _error(400, "InvalidBodyContent", "body is not a JSON object")
        return body

    async def _publish(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return self._unauthorized()
        body = await self._json_body(request)
        if isinstance(body, web.Response):
            return body
        name = body.get("name")
        if not isinstance(name, str) or not name:
            return _error(422, "MissingRequired", "name is required", "name")
        if not name.startswith("reply."):
            return _error(403, "Forbidden", f"agents may only publish reply.* events: {name}")
        problem = _schema_problem(body)
        if problem is not None:
            return _error(422, "InvalidType", problem[1], problem[0])
        self.replies.append(body)
        await self._notify()
        return web.json_response({"type": "publish", **body}, status=201)

    async def _container_event(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return self._unauthorized()
        body = await self._json_body(request)
        if isinstance(body, web.Response):
            return body
        self.container_event_attempts.append(body)
        if self.container_event_answers:
            status = self.container_event_answers.pop(0)
            return _error(status, "ServiceUnavailable", f"answered {status} by the test")
        self.container_events.append(body)
        await self._notify()
        return web.json_response({"type": "containerEvent", **body}, status=201)


    async def _service_event(self, request: web.Request) -> web.Response:
        """Cattle's ServiceEventFilter, in short: another key than the health key is
        'CantVerifyHealthcheck' (403), externalTimestamp is required (422)."""
        if not self._authorized(request, self.health_keys or None):
            return _error(403, "CantVerifyHealthcheck", "the caller is not a healthcheck agent of this instance")
        body = await self._json_body(request)
        if isinstance(body, web.Response):
            return body
        status = self.service_event_answers.pop(0) if self.service_event_answers else 201
        if not isinstance(body.get("externalTimestamp"), int):
            status = 422
        self.service_event_attempts.append((time.monotonic(), status, body))
        if status == 201:
            self.service_events.append(body)
        await self._notify()
        if status == 422:
            return _error(422, "MissingRequired", "externalTimestamp is required", "externalTimestamp")
        if status != 201:
            return _error(status, "CantVerifyHealthcheck" if status == 403 else "Conflict", f"answered {status} by the test")
        return web.json_response({"type": "serviceEvent", "state": "created", **body}, status=201)


def _answers(reply: dict[str, Any], event: dict[str, Any]) -> bool:
    """Cattle's FutureEventListener match: reply name is replyTo, previousIds[0] the id."""
    previous = reply.get("previousIds") or [None]
    return reply.get("name") == event.get("replyTo") and previous[0] == event.get("id")


def _schema_problem(body: dict[str, Any]) -> tuple[str, str] | None:
    """The field types of Cattle's `publish` schema that a reply can get wrong."""
    checks: dict[str, Callable[[Any], bool]] = {
        "id": lambda v: isinstance(v, str),
        "previousIds": lambda v: isinstance(v, list) and all(isinstance(i, str) for i in v),
        "resourceType": lambda v: isinstance(v, str),
        "resourceId": lambda v: isinstance(v, str),
        "time": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "data": lambda v: isinstance(v, dict),
        "transitioning": lambda v: v in _TRANSITIONING,
        "transitioningMessage": lambda v: isinstance(v, str),
        "transitioningInternalMessage": lambda v: isinstance(v, str),
        "transitioningProgress": lambda v: isinstance(v, int) and not isinstance(v, bool),
    }
    for key, ok in checks.items():
        value = body.get(key)
        if value is not None and not ok(value):
            return key, f"{key} has the wrong type or value: {value!r}"
    return None


def _error(status: int, code: str, detail: str, field_name: str | None = None) -> web.Response:
    body: dict[str, Any] = {"type": "error", "status": status, "code": code, "detail": detail}
    if field_name:
        body["fieldName"] = field_name
    return web.json_response(body, status=status)


async def _serve(port: int, access_key: str, secret_key: str, keepalive: float | None) -> None:
    double = ControllerDouble(access_key, secret_key, keepalive_interval=keepalive)
    await double.start(port)
    print(f"READY {double.url}", flush=True)
    done = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, done.set)
    await done.wait()
    await double.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description="Run a controller double until SIGTERM.")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--access-key", default="agent")
    parser.add_argument("--secret-key", default="secret")
    parser.add_argument("--keepalive", type=float, default=None)
    args = parser.parse_args()
    asyncio.run(_serve(args.port, args.access_key, args.secret_key, args.keepalive))


if __name__ == "__main__":
    main()
