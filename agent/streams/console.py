"""The console stream: a VM's serial console (shared, with scrollback) or its VNC display.

Which one: the token's console object may say ``"kind": "serial"`` or ``"kind": "vnc"``;
without it the handler's ``default_kind`` applies (``"serial"``). Rancher 1.x's UI opened its
VM console with noVNC (subprotocol ``binary``), so a deployment serving that UI sets
``default_kind="vnc"``, or its token issuer adds the kind.

Frames, both ways: with the ``binary`` subprotocol raw bytes in binary frames; otherwise text
frames carrying base64 (the Rancher UI's encoding). A text frame that is not base64 closes the
stream with 1007.

Serial: every viewer of a VM shares one console session held by the driver
(drivers.libvirt.console_stream: scrollback replay, slow viewers dropped, reopened across VM
restarts). Close codes: 1000 when the client leaves; 1008 when this viewer fell too far behind
(reconnect to resume; the others are not affected); 1011 when the VM is gone, not running,
libvirt is unreachable, or another client (``virsh console --force``) took the console over.

VNC: the driver hands over a byte stream to the VM's VNC server (libvirt: a socket from
``virDomainOpenGraphicsFD``, no TCP port involved, and the VNC password skipped: the verified
token already authorises the user; see drivers.libvirt.stream_access).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
from typing import Any, Protocol

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from agent.streams.auth import Claims
from agent.streams.server import BINARY, CLOSE_POLICY, CLOSE_UNAVAILABLE, close_with
from drivers.base import ConsoleClosed, ConsoleViewer, DriverError

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


class Consoles(Protocol):
    """What the handler needs from the driver (drivers.base.Hypervisor)."""

    async def attach_console(self, instance_uuid: str) -> ConsoleViewer: ...
    async def open_graphics(self, instance_uuid: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]: ...


class ConsoleHandler:
    """Handler for ``console`` streams (see the module docstring)."""

    def __init__(self, driver: Consoles, *, default_kind: str = "serial",
                 logger: logging.Logger | None = None) -> None:
        self.driver = driver
        self.default_kind = default_kind
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
            viewer = await self.driver.attach_console(instance)
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
            reader, writer = await self.driver.open_graphics(instance)
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
