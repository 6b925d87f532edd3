"""The console stream: a VM's serial console (shared, with scrollback) or its VNC display.

Which one: the token's console object may say ``"kind": "serial"`` or ``"kind": "vnc"``;
without it the handler's ``default_kind`` applies (``"serial"``). Rancher 1.x's UI opened its
VM console with noVNC (subprotocol ``binary``), so a deployment serving that UI sets
``default_kind="vnc"``, or its token issuer adds the kind.

Frames, both ways: with the ``binary`` subprotocol raw bytes in binary frames; otherwise text
frames carrying base64 (the Rancher UI's encoding). A text frame that is not base64 closes the
stream with 1007.

Serial: every viewer of a VM shares one libvirt console session
(drivers.libvirt.console_stream: scrollback replay, slow viewers dropped, reopened across VM
restarts). Close codes: 1000 when the client leaves; 1008 when this viewer fell too far behind
(reconnect to resume; the others are not affected); 1011 when the VM is gone, not running,
libvirt is unreachable, or another client (``virsh console --force``) took the console over.

VNC: ``virDomainOpenGraphicsFD`` hands the agent a socket already connected to qemu's VNC
server, so no TCP port is involved. With ``vnc_skip_auth`` (the default) qemu skips the VNC
password for that connection: the verified token already authorises the user, and the
password, derived on this host, is not something a Rancher user could know. Without it, or
when the fd cannot be had (a remote libvirt URI), the VNC server asks for the domain's
password as usual (the TCP fallback reads the listen address and port from the live XML).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import socket
from typing import Any

import libvirt
from lxml import etree
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from agent.streams.auth import Claims
from agent.streams.server import BINARY, CLOSE_POLICY, CLOSE_UNAVAILABLE, close_with
from drivers.base import DriverError, NotFound
from drivers.libvirt.console_stream import (
    ConsoleClosed,
    ConsoleDomains,
    ConsoleHubs,
    ConsoleViewer,
)

CLOSE_INVALID_DATA = 1007
VNC_CHUNK = 64 * 1024
#: Console output is gathered this long before a frame is sent (fewer, larger frames).
LINGER_SECONDS = 0.005


class FrameError(ValueError):
    """A client frame that cannot be decoded."""


class Frames:
    """The two encodings every byte stream here speaks: binary frames or base64 text frames."""

    def __init__(self, ws: ServerConnection) -> None:
        self.ws = ws
        self.binary = ws.subprotocol == BINARY

    async def send(self, data: bytes) -> None:
        await self.ws.send(data if self.binary else base64.b64encode(data).decode("ascii"))

    @staticmethod
    def decode(message: str | bytes) -> bytes:
        if isinstance(message, bytes):
            return message
        try:
            return base64.b64decode(message, validate=True)
        except (binascii.Error, ValueError):
            raise FrameError("text frames must carry base64") from None


class ConsoleHandler:
    """Handler for ``console`` streams (see the module docstring)."""

    def __init__(self, driver: ConsoleDomains, *, hubs: ConsoleHubs | None = None, default_kind: str = "serial",
                 vnc_skip_auth: bool = True, logger: logging.Logger | None = None) -> None:
        self.driver = driver
        self.hubs = hubs or ConsoleHubs(driver, logger=logger)
        self.default_kind = default_kind
        self.vnc_skip_auth = vnc_skip_auth
        self._log = logger or logging.getLogger("herdsman.streams.console")

    async def __call__(self, ws: ServerConnection, claims: Claims) -> None:
        kind = claims.payload.get("kind") or self.default_kind
        if kind == "serial":
            await self.serial(ws, claims.instance)
        elif kind == "vnc":
            await self.vnc(ws, claims.instance)
        else:
            await close_with(ws, CLOSE_POLICY, f"unknown console kind {kind!r} (serial or vnc)")

    # -- serial -----------------------------------------------------------------------------------
    async def serial(self, ws: ServerConnection, instance: str) -> None:
        try:
            viewer = self.hubs.attach(instance)
        except DriverError as exc:
            await close_with(ws, CLOSE_UNAVAILABLE, str(exc))
            return
        frames = Frames(ws)
        code, reason = 1000, ""
        try:
            code, reason = await _first_of(self._serial_out(frames, viewer), self._serial_in(frames, viewer))
        finally:
            viewer.close()
        await close_with(ws, code, reason)

    @staticmethod
    async def _serial_out(frames: Frames, viewer: ConsoleViewer) -> tuple[int, str]:
        try:
            while True:
                await frames.send(await viewer.read(linger=LINGER_SECONDS))
        except ConsoleClosed as exc:
            code = CLOSE_POLICY if exc.ended.reason == "slow" else CLOSE_UNAVAILABLE
            return (1000, "") if exc.ended.reason == "closed" else (code, exc.ended.message)
        except ConnectionClosed:
            return 1000, ""

    @staticmethod
    async def _serial_in(frames: Frames, viewer: ConsoleViewer) -> tuple[int, str]:
        try:
            async for message in frames.ws:
                data = Frames.decode(message)
                if data:
                    await viewer.write(data)
        except FrameError as exc:
            return CLOSE_INVALID_DATA, str(exc)
        except (ConsoleClosed, ConnectionClosed):
            pass  # the output side reports why
        return 1000, ""

    # -- VNC ----------------------------------------------------------------------------------------
    async def vnc(self, ws: ServerConnection, instance: str) -> None:
        try:
            reader, writer = await self.open_vnc(instance)
        except (DriverError, OSError) as exc:
            await close_with(ws, CLOSE_UNAVAILABLE, f"VNC: {exc}")
            return
        frames = Frames(ws)

        async def to_client() -> tuple[int, str]:
            while data := await reader.read(VNC_CHUNK):
                await frames.send(data)
            return 1000, "the VNC server closed the connection"

        async def from_client() -> tuple[int, str]:
            try:
                async for message in ws:
                    writer.write(Frames.decode(message))
                    await writer.drain()
            except FrameError as exc:
                return CLOSE_INVALID_DATA, str(exc)
            return 1000, ""

        try:
            code, reason = await _first_of(to_client(), from_client())
        except (ConnectionClosed, OSError):
            code, reason = 1000, ""
        finally:
            writer.close()
        await close_with(ws, code, reason)

    async def open_vnc(self, instance: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A byte stream to the VM's VNC server: a libvirt-passed socket, else TCP to its listener."""
        dom = self.driver.domain(instance)
        if not dom.isActive():
            raise DriverError("the VM is not running")
        flags = libvirt.VIR_DOMAIN_OPEN_GRAPHICS_SKIPAUTH if self.vnc_skip_auth else 0
        try:
            fd = dom.openGraphicsFD(0, flags)
        except libvirt.libvirtError as exc:
            self._log.info("openGraphicsFD failed (%s); connecting over TCP", exc.get_error_message())
            host, port = vnc_address(dom)
            return await asyncio.open_connection(host, port)
        return await asyncio.open_connection(sock=socket.socket(fileno=fd))


def vnc_address(dom: libvirt.virDomain) -> tuple[str, int]:
    """The VNC listener of a running domain from its live XML (wildcards mean loopback)."""
    root = etree.fromstring(dom.XMLDesc(0).encode())
    graphics = root.find("devices/graphics[@type='vnc']")
    if graphics is None:
        raise NotFound("this VM has no VNC display")
    port = int(graphics.get("port", "-1"))
    if port <= 0:
        raise DriverError("the VM's VNC display has no TCP port")
    listen = graphics.find("listen[@type='address']")
    host = (listen.get("address") if listen is not None else None) or graphics.get("listen") or "127.0.0.1"
    return ("127.0.0.1" if host in ("0.0.0.0", "::") else host), port


async def _first_of(*coroutines: Any) -> tuple[int, str]:
    """Run the pumps; the first to finish decides the close code, the others are cancelled."""
    tasks = [asyncio.ensure_future(c) for c in coroutines]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        return next(iter(done)).result()  # type: ignore[no-any-return]
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
