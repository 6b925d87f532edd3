"""The exec stream: a command in the VM through qemu-guest-agent, its output streamed.

Token object (Cattle's ``containerExec``): ``{"Cmd": [...], "AttachStdin": bool,
"AttachStdout": bool, "Tty": bool, "Container": uuid}``. The command runs as the guest
agent's user (root on most guests) under ``/bin/sh`` with the guest agent's PATH; the driver
runs it (drivers.base.GuestCommand; how the libvirt driver streams its output is explained in
drivers.libvirt.guest_agent).

Frames, agent → client:

- stdout: binary frames (subprotocol ``binary``) or text frames with base64 (Rancher UI);
- without a TTY, control frames are JSON text frames (JSON never starts like base64 does):
  ``{"stream": "stderr", "data": "<base64>"}`` for stderr, ``{"exit": <code>}`` last, or
  ``{"error": "<message>"}`` when the command could not run or was stopped;
- then the close: 1000 with reason ``exit <code>`` after the command ended; 1008 for a bad
  request; 1011 when the VM, libvirt or the guest agent is unavailable or the command timed
  out (the reason says which, e.g. "the guest agent is not running in this VM").

``AttachStdout: false`` drops the output (the exit code is still sent).

Client → agent (only with ``AttachStdin``): stdin as binary frames or base64 text frames;
the JSON text frame ``{"eof": true}`` ends the input (closing the websocket also does).
Rancher's ``:resizeTTY:<cols>,<rows>`` frames are accepted and ignored. Without
``AttachStdin`` the command's stdin is ``/dev/null``.

What ``Tty: true`` means for a VM. The guest agent cannot allocate a terminal, so:

- when the guest has util-linux ``script`` (most Linux distributions), the command runs under
  it and gets a real pseudo-terminal in the guest: echo, line editing, Ctrl-C, job control and
  full-screen programs behave as on the serial console; bytes pass through untouched. The
  terminal size stays the default (80x24): resizes are ignored.
- otherwise the agent emulates a terminal's cooked mode (:class:`LineDiscipline`): it echoes
  what is typed, handles Backspace and Ctrl-U, sends a line on Enter (CR becomes LF), turns
  Ctrl-C into SIGINT for the command and Ctrl-D on an empty line into end of input, and turns
  LF into CRLF on output. The command sees pipes, not a terminal: ``sh`` prints no prompt and
  full-screen programs do not work.

Either way stderr is merged into stdout (a terminal has one output) and no control frames are
sent: errors are printed into the terminal and the exit code is only in the close reason, as
Rancher's exec was a raw TTY stream. A client that disconnects sends the command SIGHUP, as a
terminal hangup would. The ``timeout`` (default 300 s) bounds the whole command, which is then
killed (SIGKILL).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from collections.abc import Sequence
from typing import Any, Protocol

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from agent.streams.auth import Claims
from agent.streams.console import CLOSE_INVALID_DATA, FrameError, Frames
from agent.streams.server import CLOSE_POLICY, CLOSE_UNAVAILABLE, close_with
from drivers.base import DriverError, GuestAgentError, GuestCommand

DEFAULT_TIMEOUT = 300.0
_ERASE = b"\b \b"


class GuestCommands(Protocol):
    """What the handler needs from the driver (drivers.base.Hypervisor)."""

    async def guest_exec(self, instance_uuid: str, argv: Sequence[str], *, stdin: bool,
                         tty: bool) -> GuestCommand: ...


class LineDiscipline:
    """Cooked-mode terminal input done by the agent when the guest has no terminal to offer.

    ``feed`` turns keystrokes into actions: ``("echo", bytes)`` for the client, ``("input",
    bytes)`` for the command, ``("eof", b"")``, ``("signal", b"INT")``.
    """

    def __init__(self) -> None:
        self.line = bytearray()
        self._escape = 0  # 0 none, 1 after ESC, 2 inside a CSI/SS3 sequence

    def feed(self, data: bytes) -> list[tuple[str, bytes]]:
        actions: list[tuple[str, bytes]] = []
        echo = bytearray()

        def emit(kind: str, payload: bytes) -> None:
            if echo:
                actions.append(("echo", bytes(echo)))
                echo.clear()
            actions.append((kind, payload))

        for byte in data:
            if self._escape == 1:
                self._escape = 2 if byte in b"[O" else 0
                continue
            if self._escape == 2:  # arrows and the like: no history or cursor keys here
                if 0x40 <= byte <= 0x7E:
                    self._escape = 0
                continue
            if byte == 0x1B:
                self._escape = 1
            elif byte in (0x0D, 0x0A):
                echo += b"\r\n"
                emit("input", bytes(self.line) + b"\n")
                self.line.clear()
            elif byte in (0x7F, 0x08):
                if self.line:
                    while self.line and 0x80 <= self.line[-1] < 0xC0:  # a UTF-8 continuation byte
                        self.line.pop()
                    if self.line:
                        self.line.pop()
                    echo += _ERASE
            elif byte == 0x15:  # Ctrl-U
                echo += _ERASE * len(self.line.decode(errors="replace"))
                self.line.clear()
            elif byte == 0x03:  # Ctrl-C
                echo += b"^C\r\n"
                self.line.clear()
                emit("signal", b"INT")
            elif byte == 0x04:  # Ctrl-D
                if self.line:
                    emit("input", bytes(self.line))
                    self.line.clear()
                else:
                    emit("eof", b"")
            elif byte >= 0x20 or byte == 0x09:
                self.line.append(byte)
                echo.append(byte)
        if echo:
            actions.append(("echo", bytes(echo)))
        return actions


def crlf(data: bytes, after_cr: bool) -> tuple[bytes, bool]:
    """LF → CRLF (a terminal's ONLCR) without doubling an existing CR; returns (data, ends with CR)."""
    out = bytearray()
    previous_cr = after_cr
    for line in data.split(b"\n")[:-1]:
        out += line
        out += b"\n" if (line.endswith(b"\r") or (not line and previous_cr)) else b"\r\n"
        previous_cr = False
    out += data.rsplit(b"\n", 1)[-1] if b"\n" in data else data
    return bytes(out), data.endswith(b"\r")


class _Output:
    """Frames to the client for one exec (see the module docstring)."""

    def __init__(self, ws: ServerConnection, *, tty: bool, translate: bool, attach: bool = True) -> None:
        self.frames = Frames(ws)
        self.ws = ws
        self.tty = tty
        self.translate = translate
        self.attach = attach
        self._after_cr = False

    async def data(self, stream: str, data: bytes) -> None:
        if not self.attach:
            return
        if self.translate:
            data, self._after_cr = crlf(data, self._after_cr)
        if stream == "stdout" or self.tty:
            await self.frames.send(data)
        else:
            await self.ws.send(json.dumps({"stream": stream, "data": base64.b64encode(data).decode("ascii")}))

    async def finish(self, code: int) -> None:
        if not self.tty:
            await self.ws.send(json.dumps({"exit": code}))
        await close_with(self.ws, 1000, f"exit {code}")

    async def fail(self, close_code: int, message: str) -> None:
        try:
            if self.tty:
                await self.frames.send(f"\r\nherdsman: {message}\r\n".encode())
            else:
                await self.ws.send(json.dumps({"error": message}))
        except ConnectionClosed:
            return
        await close_with(self.ws, close_code, message)


def command_of(payload: dict[str, Any]) -> list[str]:
    cmd = payload.get("Cmd")
    if isinstance(cmd, str):
        cmd = [cmd]
    if not isinstance(cmd, list) or not cmd or not all(isinstance(a, str) for a in cmd):
        raise ValueError("Cmd must be a non-empty list of strings")
    if any("\x00" in a for a in cmd):
        raise ValueError("Cmd must not contain NUL characters")
    return cmd


class ExecHandler:
    """Handler for ``exec`` streams (see the module docstring)."""

    def __init__(self, driver: GuestCommands, *, timeout: float = DEFAULT_TIMEOUT,
                 logger: logging.Logger | None = None) -> None:
        self.driver = driver
        self.timeout = timeout
        self._log = logger or logging.getLogger("herdsman.streams.exec")

    async def __call__(self, ws: ServerConnection, claims: Claims) -> None:
        payload = claims.payload
        tty = bool(payload.get("Tty", False))
        out = _Output(ws, tty=tty, translate=False, attach=payload.get("AttachStdout", True) is not False)
        try:
            cmd = command_of(payload)
        except ValueError as exc:
            await out.fail(CLOSE_POLICY, str(exc))
            return
        try:
            process = await self.start(claims.instance, cmd, stdin=bool(payload.get("AttachStdin", False)), tty=tty)
        except DriverError as exc:  # GuestAgentError included
            self._log.info("exec in %s refused: %s", claims.instance, exc)
            await out.fail(CLOSE_UNAVAILABLE, str(exc))
            return
        discipline = LineDiscipline() if tty and not process.pty else None
        out.translate = discipline is not None
        await self._run(ws, out, process, discipline)

    async def start(self, instance: str, cmd: Sequence[str], *, stdin: bool, tty: bool) -> GuestCommand:
        """Start ``cmd`` in the VM (raises DriverError / GuestAgentError with a user's message)."""
        return await self.driver.guest_exec(instance, cmd, stdin=stdin, tty=tty)

    async def _run(self, ws: ServerConnection, out: _Output, process: GuestCommand,
                   discipline: LineDiscipline | None) -> None:
        pump = asyncio.ensure_future(self._pump(out, process))
        feeder = asyncio.ensure_future(self._feed(ws, out, process, discipline))
        failure: tuple[int, str] | None = None
        try:
            done, _ = await asyncio.wait({pump, feeder}, timeout=self.timeout, return_when=asyncio.FIRST_COMPLETED)
            if pump in done:
                pump.result()
            elif feeder in done:  # the client went away (the feeder reads until the close)
                await process.signal("HUP")  # as a terminal hangup would
            else:
                failure = (CLOSE_UNAVAILABLE, f"timed out after {self.timeout:g} s; the command was killed")
                await process.signal("KILL")
        except ConnectionClosed:
            await process.signal("HUP")
        except GuestAgentError as exc:
            failure = (CLOSE_UNAVAILABLE, str(exc))
        finally:
            for task in (pump, feeder):
                task.cancel()
            await asyncio.gather(pump, feeder, return_exceptions=True)
            await process.close()
        if failure is not None:
            self._log.info("exec of %s ended: %s", process.argv[0], failure[1])
            await out.fail(*failure)
        elif process.exit_code is not None and pump.done() and not pump.cancelled():
            await out.finish(process.exit_code)

    @staticmethod
    async def _pump(out: _Output, process: GuestCommand) -> None:
        async for stream, data in process.output():
            await out.data(stream, data)

    @staticmethod
    async def _feed(ws: ServerConnection, out: _Output, process: GuestCommand,
                    discipline: LineDiscipline | None) -> None:
        """Client frames → the command's stdin (through the line discipline for an emulated TTY).

        Returns when the client has closed the websocket.
        """
        try:
            async for message in ws:
                if isinstance(message, str) and message.startswith((":resizeTTY:", "{")):
                    if process.stdin and _is_eof(message):
                        await process.close_stdin()
                    continue
                data = Frames.decode(message)
                if not process.stdin:
                    continue
                if discipline is None:
                    await process.write(data)
                    continue
                for action, payload in discipline.feed(data):
                    if action == "echo":
                        await out.frames.send(payload)
                    elif action == "input":
                        await process.write(payload)
                    elif action == "eof":
                        await process.close_stdin()
                    elif action == "signal":
                        await process.signal(payload.decode())
        except FrameError as exc:
            await close_with(ws, CLOSE_INVALID_DATA, str(exc))
        except ConnectionClosed:
            pass
        except GuestAgentError:
            await asyncio.Future()  # input refused (the command is ending): wait for the output side


def _is_eof(message: str) -> bool:
    try:
        control = json.loads(message)
    except ValueError:
        return False
    return isinstance(control, dict) and control.get("eof") is True
