"""The `proxy` stream: HTTP, or raw TCP, to a port of a VM.

Two framings:
- Cattle's container-proxy (cattle-protocol.md §5; text frames): the client's first message is
  a JSON HTTPMessage `{hijack, host, method, url, headers, body, eof}` (body base64), further
  messages carry more request body until one has `eof: true`. The agent answers with
  `{code, headers}`, then `{body}` chunks as the guest sends them, then `{eof: true}`. With
  `hijack: true` (an Upgrade request) the request head is written to the guest as is and the
  connection becomes a byte pipe, still in HTTPMessage `body` frames.
- Raw TCP when the client asks for the `binary` subprotocol: binary frames both ways.

Where it connects — the rule a token cannot get around: the VM's primary address (its DHCP
lease or guest-agent address). A token's `address` is used only when it IS that address, or a
guest address inside the managed libvirt network (not its network/broadcast address, not the
host's own address on it). Anything else, e.g. another host, the host itself or 127.0.0.1, is
refused before any connection is made. The port comes from `address`, else `port`, else 80.

httpx does the HTTP side: it is async (one loop, no threads), streams a response body chunk by
chunk as it arrives (`aiter_raw`: bytes as sent, so Content-Encoding and Content-Length stay
true), streams a request body from an async generator, has per-phase timeouts, and is already
a dependency. `trust_env=False`: the host's HTTP_PROXY must never apply to guest addresses.
Guests' TLS certificates are not verified (a VM's certificate cannot name its DHCP address).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import ipaddress
import json
import logging
import re
import ssl
from collections.abc import AsyncIterator, Sequence, Set
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlsplit

import httpx
from websockets.asyncio.server import ServerConnection

from agent.streams.auth import Claims
from agent.streams.server import (
    BINARY,
    CLOSE_BAD_GATEWAY,
    CLOSE_POLICY,
    CLOSE_UNAVAILABLE,
    close_with,
)
from drivers.base import DriverError, GuestNetwork, IpAddress, IpNetwork


CHUNK = 32 * 1024
#: Hop-by-hop headers (RFC 9110 §7.6.1) never cross a proxy; Host is set from the message.
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection",
                        "te", "trailer", "transfer-encoding", "upgrade", "host"})
_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]{1,64}$")
_BAD_VALUE = re.compile(r"[\x00\r\n]")


class ProxyRefused(Exception):
    pass


class ProxySource(Protocol):
    """What the handler needs from the driver (drivers.base.Hypervisor)."""

    async def guest_network(self, instance_uuid: str, *, subnets: bool = False) -> GuestNetwork: ...


@dataclass(frozen=True)
class Target:
    address: str
    port: int
    scheme: str

    @property
    def netloc(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"{host}:{self.port}"


# -- where to connect ------------------------------------------------------------------------
def split_address(text: str) -> tuple[str, int | None]:
    """'10.0.0.5:8080' → ('10.0.0.5', 8080); '10.0.0.5' → (…, None); '[fd00::5]:80' for IPv6."""
    text = text.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest.removeprefix(":") or None
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
    else:
        host, port = text, None
    try:
        host = str(ipaddress.ip_address(host))  # one spelling, so equality with the VM's address holds
    except ValueError:
        raise ProxyRefused(f"proxy address {host!r} is not an IP address") from None
    if port is None:
        return host, None
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ProxyRefused(f"proxy port {port!r} is not a port number")
    return host, int(port)


def choose_address(requested: str | None, primary: str | None, ranges: Sequence[IpNetwork],
                   host_addresses: Set[IpAddress]) -> str:
    """Apply the rule in the module docstring; ProxyRefused says why a request is refused."""
    if requested is None or requested == primary:
        if primary is None:
            raise ProxyRefused("the VM has no known address (not running, or no DHCP lease yet)")
        return primary
    candidate = ipaddress.ip_address(requested)
    for network in ranges:
        if candidate in network and candidate not in host_addresses and candidate not in (
                network.network_address, network.broadcast_address):
            return requested
    raise ProxyRefused(f"address {requested} is neither the VM's address nor a guest address of the managed network")


# -- the HTTPMessage framing -------------------------------------------------------------------
def encode(message: dict[str, Any]) -> str:
    out = dict(message)
    if "body" in out:
        out["body"] = base64.b64encode(out["body"]).decode()
    return json.dumps(out, separators=(",", ":"))


def decode(frame: str | bytes) -> dict[str, Any]:
    try:
        message = json.loads(frame)
    except ValueError:
        raise ProxyRefused("proxy messages must be JSON HTTPMessage objects") from None
    if not isinstance(message, dict):
        raise ProxyRefused("proxy messages must be JSON HTTPMessage objects")
    body = message.get("body") or ""
    if not isinstance(body, str):
        raise ProxyRefused("HTTPMessage.body must be base64 text")
    try:
        message["body"] = base64.b64decode(body, validate=True)
    except binascii.Error:
        raise ProxyRefused("HTTPMessage.body is not valid base64") from None
    return message


def request_head(message: dict[str, Any]) -> tuple[str, str, list[tuple[str, str]], str | None]:
    """(method, path?query, headers, Host) of the client's first message, every part checked:
    only the path and query of `url` are used, so a message cannot pick the host."""
    method = message.get("method") or "GET"
    if not isinstance(method, str) or not _TOKEN.match(method):
        raise ProxyRefused("HTTPMessage.method is not an HTTP method")
    url = message.get("url") or "/"
    if not isinstance(url, str) or _BAD_VALUE.search(url) or " " in url:
        raise ProxyRefused("HTTPMessage.url is not a URL")
    parts = urlsplit(url)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    if not target.startswith("/"):
        target = "/" + target
    headers: list[tuple[str, str]] = []
    raw = message.get("headers") or {}
    if not isinstance(raw, dict):
        raise ProxyRefused("HTTPMessage.headers must be an object of lists")
    for name, values in raw.items():
        values = values if isinstance(values, list) else [values]
        if not isinstance(name, str) or not _TOKEN.match(name):
            raise ProxyRefused(f"HTTPMessage.headers: {name!r} is not a header name")
        for value in values:
            if not isinstance(value, str) or _BAD_VALUE.search(value):
                raise ProxyRefused(f"HTTPMessage.headers.{name}: not a header value")
            headers.append((name, value))
    host = message.get("host")
    if host is not None and (not isinstance(host, str) or _BAD_VALUE.search(host) or " " in host):
        raise ProxyRefused("HTTPMessage.host is not a host")
    return method, target, headers, host or None


def response_headers(raw: list[tuple[bytes, bytes]]) -> dict[str, list[str]]:
    grouped: dict[str, list[str]] = {}
    for name, value in raw:
        key = name.decode("latin-1")
        if key.lower() not in HOP_BY_HOP:
            grouped.setdefault(key, []).append(value.decode("latin-1"))
    return grouped


class ProxyHandler:
    """Stream handler for kind "proxy"."""

    def __init__(self, driver: ProxySource, *, connect_timeout: float = 10.0,
                 read_timeout: float = 300.0, logger: logging.Logger | None = None) -> None:
        self.driver = driver
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self._log = logger or logging.getLogger("herdsman.streams.proxy")

    async def target(self, claims: Claims) -> Target:
        payload = claims.payload
        scheme = payload.get("scheme") or "http"
        if scheme not in ("http", "https"):
            raise ProxyRefused(f"scheme {scheme!r} is not http or https")
        requested, port = (None, None)
        if payload.get("address"):
            if not isinstance(payload["address"], str):
                raise ProxyRefused("address must be text")
            requested, port = split_address(payload["address"])
        if port is None:
            port = payload.get("port", 80)
            if isinstance(port, str) and port.isdigit():
                port = int(port)
            if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
                raise ProxyRefused(f"port {port!r} is not a port number")
        primary = (await self.driver.guest_network(claims.instance)).primary
        if requested in (None, primary):
            return Target(choose_address(requested, primary, (), frozenset()), port, scheme)
        network = await self.driver.guest_network(claims.instance, subnets=True)
        return Target(choose_address(requested, network.primary, network.subnets, network.host_addresses),
                      port, scheme)

    async def __call__(self, ws: ServerConnection, claims: Claims) -> None:
        try:
            target = await self.target(claims)
        except ProxyRefused as exc:
            await close_with(ws, CLOSE_POLICY, str(exc))
            return
        except DriverError as exc:
            await close_with(ws, CLOSE_UNAVAILABLE, str(exc))
            return
        self._log.info("proxy", extra={"instance": claims.instance, "target": target.netloc,
                                       "mode": "tcp" if ws.subprotocol == BINARY else "http"})
        if ws.subprotocol == BINARY:
            await self._tcp(ws, target)
            return
        try:
            first = decode(await ws.recv())
            if first.get("hijack"):
                await self._hijack(ws, target, first)
            else:
                await self._http(ws, target, first)
        except ProxyRefused as exc:
            await close_with(ws, CLOSE_POLICY, str(exc))

    # -- HTTP ------------------------------------------------------------------------------------
    async def _body(self, ws: ServerConnection, first: dict[str, Any]) -> AsyncIterator[bytes]:
        if first["body"]:
            yield first["body"]
        if first.get("eof"):
            return
        while True:
            message = decode(await ws.recv())
            if message["body"]:
                yield message["body"]
            if message.get("eof"):
                return

    async def _http(self, ws: ServerConnection, target: Target, first: dict[str, Any]) -> None:
        method, path, raw_headers, host = request_head(first)
        headers = [(k, v) for k, v in raw_headers if k.lower() not in HOP_BY_HOP]
        if host:
            headers.append(("Host", host))
        body = self._body(ws, first)
        content: AsyncIterator[bytes] | None = body
        if not any(k.lower() == "content-length" for k, _ in headers):
            # like Go's client: no length and an empty body means no body (a GET stays a GET)
            head = await anext(body, None)
            content = None if head is None else _prepend(head, body)
        timeout = httpx.Timeout(connect=self.connect_timeout, read=self.read_timeout, write=60.0, pool=self.connect_timeout)
        sent_head = False
        try:
            async with httpx.AsyncClient(verify=False, trust_env=False, timeout=timeout, follow_redirects=False) as client:
                request = client.build_request(method, f"{target.scheme}://{target.netloc}{path}", headers=headers, content=content)
                response = await client.send(request, stream=True)
                try:
                    await ws.send(encode({"code": response.status_code, "headers": response_headers(response.headers.raw)}))
                    sent_head = True
                    async for chunk in response.aiter_raw():  # as it arrives: no re-buffering
                        await ws.send(encode({"body": chunk}))
                finally:
                    await response.aclose()
        except httpx.HTTPError as exc:
            reason = f"{target.netloc}: {type(exc).__name__}: {exc}".rstrip(": ")
            self._log.info("proxy request failed", extra={"target": target.netloc, "error": reason})
            if sent_head:
                await close_with(ws, CLOSE_BAD_GATEWAY, reason)
                return
            await ws.send(encode({"code": 502, "headers": {"Content-Type": ["text/plain; charset=utf-8"]},
                                  "body": f"bad gateway: {reason}\n".encode()}))
        await ws.send(encode({"eof": True}))
        await ws.close()

    async def _hijack(self, ws: ServerConnection, target: Target, first: dict[str, Any]) -> None:
        """An Upgrade request: send its head as is, then pipe bytes both ways in body frames."""
        method, path, raw_headers, host = request_head(first)
        lines = [f"{method} {path} HTTP/1.1", f"Host: {host or target.netloc}"]
        lines += [f"{k}: {v}" for k, v in raw_headers if k.lower() != "host"]
        try:
            reader, writer = await self._connect(target)
        except OSError as exc:
            await close_with(ws, CLOSE_BAD_GATEWAY, f"{target.netloc}: {exc}")
            return
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))

        async def upstream() -> None:
            async for chunk in self._body(ws, first):
                writer.write(chunk)
                await writer.drain()
            await ws.wait_closed()  # the request is complete; the guest's answer may still come

        async def downstream() -> None:
            while chunk := await reader.read(CHUNK):
                await ws.send(encode({"body": chunk}))
            await ws.send(encode({"eof": True}))

        await _pipe(ws, writer, upstream(), downstream())

    # -- raw TCP ---------------------------------------------------------------------------------
    async def _connect(self, target: Target) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        context = None
        if target.scheme == "https":
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return await asyncio.wait_for(asyncio.open_connection(target.address, target.port, ssl=context, limit=CHUNK),
                                      self.connect_timeout)

    async def _tcp(self, ws: ServerConnection, target: Target) -> None:
        try:
            reader, writer = await self._connect(target)
        except (OSError, TimeoutError) as exc:
            await close_with(ws, CLOSE_BAD_GATEWAY, f"{target.netloc}: {exc or type(exc).__name__}")
            return

        async def upstream() -> None:
            async for message in ws:
                writer.write(message.encode() if isinstance(message, str) else message)
                await writer.drain()

        async def downstream() -> None:
            while chunk := await reader.read(CHUNK):
                await ws.send(chunk)

        await _pipe(ws, writer, upstream(), downstream())


async def _prepend(head: bytes, rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    yield head
    async for chunk in rest:
        yield chunk


async def _pipe(ws: ServerConnection, writer: asyncio.StreamWriter, upstream: Any, downstream: Any) -> None:
    """Run both directions until one ends (client closed, or guest closed), then close both."""
    tasks = [asyncio.ensure_future(upstream), asyncio.ensure_future(downstream)]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()
    await ws.close()
