"""The real test guest booted through the agent, once per test module, plus a small stream server.

The console and exec tests share this: a module-scoped guest (a boot costs ~10 s under TCG)
and a plain ``websockets`` server that hands each connection to a stream handler with fixed
claims, the way the agent's stream server does after it has verified a token.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid as uuid_module
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.server import ServerConnection, serve
from websockets.typing import Subprotocol

from agent.app import Agent
from agent.streams.auth import Claims
from tests.agent_harness import REPO, instance_event, running_agent, vm_instance
from tests.controller_double import ControllerDouble
from tests.libvirtd_fixtures import (
    SYSTEM_URI,
    cleanup_test_host,
    new_test_root,
    system_connection,
)
from tests.test_e2e_guest import guest_manifest

Handler = Callable[[ServerConnection, Claims], Awaitable[None]]


@dataclass
class BootedGuest:
    uuid: str
    name: str
    agent: Agent
    ctl: ControllerDouble
    instance: dict[str, Any]
    root: Path
    kernel_version: str
    started: float  # time.monotonic() when activate returned

    @property
    def driver(self) -> Any:
        return self.agent.driver

    @property
    def log_path(self) -> Path:
        return Path(self.agent.driver.console_log_path(self.uuid))

    async def grant(self, action: str, **process: Any) -> tuple[str, str]:
        """The agent's answer to compute.instance.<action>: the stream's url and token."""
        reply = await instance_event(self.ctl, action, self.instance, process=process)
        assert reply.get("transitioning") is None, reply.get("transitioningMessage")
        body = reply["data"]["instanceHostMap"]
        return body["url"], body["token"]

    async def wait_log(self, text: str, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.log_path.exists() and text.encode() in self.log_path.read_bytes():
                return
            await asyncio.sleep(0.2)
        raise AssertionError(f"{text!r} not in the serial log after {timeout} s")


@contextlib.asynccontextmanager
async def booted_guest(name: str) -> AsyncIterator[BootedGuest]:
    """Boot the test guest (no NIC: nothing here needs one) through a running agent."""
    if os.geteuid() != 0:
        pytest.skip("needs root for qemu:///system (run scripts/test as root, as CI does)")
    up = await asyncio.create_subprocess_exec(str(REPO / "scripts" / "libvirt-up"))
    assert await asyncio.wait_for(up.wait(), 60) == 0, "scripts/libvirt-up failed"
    from tests.guest.build import ensure_guest

    kernel_version = ensure_guest().kernel_version
    token, root = new_test_root()
    pool = f"hmtest-{token}"
    try:
        image = guest_manifest(root / "images")
        async with running_agent(root, uri=SYSTEM_URI, state_dir=root / "state", log_dir=root / "log",
                                 storage_pool=pool, stream_listen="127.0.0.1:0") as (ctl, agent):
            inst = vm_instance(name, memory_mb=160, imageUuid=image, networkMode="none")
            reply = await instance_event(ctl, "activate", inst, timeout=300)
            assert reply.get("transitioning") is None, reply.get("transitioningMessage")
            try:
                yield BootedGuest(inst["uuid"], name, agent, ctl, inst, root, kernel_version, time.monotonic())
            finally:
                await instance_event(ctl, "purge", inst, timeout=120)
    finally:
        # Opened only now: libvirt's events follow the loop the agent bound them to (this one),
        # and a connection opened before that would be tied to the previous module's closed loop.
        conn = system_connection()
        try:
            cleanup_test_host(conn, root, pool)
        finally:
            conn.close()


class StreamServer:
    """A bare websocket server: each connection goes to ``handler`` with ``claims_for(path)``."""

    def __init__(self, handler: Handler, kind: str, instance: str) -> None:
        self.handler = handler
        self.kind = kind
        self.instance = instance
        self.payloads: dict[str, dict[str, Any]] = {}
        self._server: Any = None

    async def __aenter__(self) -> Self:
        def select(_conn: ServerConnection, offered: Sequence[Subprotocol]) -> Subprotocol | None:
            return Subprotocol("binary") if "binary" in offered else None

        self._server = await serve(self._serve, "127.0.0.1", 0, select_subprotocol=select, compression=None,
                                   max_size=1 << 20)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._server.close()
        await self._server.wait_closed()

    async def _serve(self, ws: ServerConnection) -> None:
        payload = self.payloads.pop(ws.request.path.lstrip("/"), {}) if ws.request else {}
        claims = Claims(kind=self.kind, instance=self.instance, payload=payload,  # type: ignore[arg-type]
                        subject=None, expires=time.time() + 300)
        await self.handler(ws, claims)

    def connect(self, payload: dict[str, Any] | None = None, *, binary: bool = False, **kwargs: Any) -> Any:
        """A client connection whose token would carry ``payload``."""
        key = uuid_module.uuid4().hex
        self.payloads[key] = payload or {}
        port = self._server.sockets[0].getsockname()[1]
        return connect(f"ws://127.0.0.1:{port}/{key}", subprotocols=[Subprotocol("binary")] if binary else None,
                       compression=None, max_size=None, **kwargs)


def decode(message: str | bytes) -> bytes:
    import base64

    return message if isinstance(message, bytes) else base64.b64decode(message)


async def read_until(ws: ClientConnection, needle: bytes, buffer: bytearray, timeout: float = 30) -> bytes:
    """Read frames into ``buffer`` until it contains ``needle``; return the buffer's content."""
    deadline = time.monotonic() + timeout
    pos = 0
    while buffer.find(needle, pos) < 0:
        pos = max(0, len(buffer) - len(needle) + 1)  # search only what is new (1 MiB arrives in ~20 B frames)
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"{needle!r} not received within {timeout} s; got ...{bytes(buffer[-500:])!r}")
        try:
            buffer += decode(await asyncio.wait_for(ws.recv(), left))
        except TimeoutError:
            continue  # reported by the check above
    return bytes(buffer)
