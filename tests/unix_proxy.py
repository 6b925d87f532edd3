"""A unix-socket proxy in front of the real libvirtd, for tests that make libvirtd go away or hang.

``cut`` drops every connection (the client sees EOF, as when libvirtd dies); ``freeze`` keeps
connections open but silent (a hung daemon: only keepalives notice). It runs its own event loop
in a thread, so whatever the code under test blocks cannot starve it.
"""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path

SYSTEM_SOCKET = "/run/libvirt/libvirt-sock"


class UnixProxy:
    """Forwards a private unix socket to libvirtd's. ``cut`` drops every connection (the
    client sees EOF, as when libvirtd dies); ``freeze`` keeps connections open but silent
    (a hung daemon: only keepalive notices). Runs its own loop in a thread so the blocking
    libvirt calls on the test's loop cannot starve it."""

    def __init__(self, path: Path, target: str = SYSTEM_SOCKET) -> None:
        self.path, self.target = str(path), target
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.server: asyncio.AbstractServer | None = None
        self.writers: set[asyncio.StreamWriter] = set()
        self.frozen = False
        self.thread.start()

    def _run(self, coro: object) -> None:
        asyncio.run_coroutine_threadsafe(coro, self.loop).result(5)  # type: ignore[arg-type]

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while data := await src.read(65536):
                while self.frozen and not dst.is_closing():
                    await asyncio.sleep(0.05)
                dst.write(data)
                await dst.drain()
        except (OSError, RuntimeError):
            pass
        finally:
            dst.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_unix_connection(self.target)
        except OSError:
            writer.close()
            return
        self.writers.update((writer, up_writer))
        await asyncio.gather(self._pump(reader, up_writer), self._pump(up_reader, writer))
        self.writers.difference_update((writer, up_writer))

    async def _listen(self) -> None:
        self.frozen = False
        self.server = await asyncio.start_unix_server(self._handle, path=self.path)

    async def _stop_listening(self, drop: bool) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None
        if os.path.exists(self.path):
            os.unlink(self.path)
        if drop:
            for w in list(self.writers):
                w.close()

    def listen(self) -> None:
        self._run(self._listen())

    def cut(self) -> None:
        self._run(self._stop_listening(drop=True))

    def freeze(self) -> None:
        self.frozen = True
        self._run(self._stop_listening(drop=False))

    def restore(self) -> None:
        self._run(self._stop_listening(drop=True))
        self.listen()

    def stop(self) -> None:
        self.cut()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
