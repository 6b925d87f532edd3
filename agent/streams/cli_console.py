"""`herdsman console NAME` and `herdsman exec NAME -- CMD...` in a local terminal.

Like `herdsman logs`, each goes through the real stream path: the stream server on
127.0.0.1:0 for the command's duration, a locally minted token, the console or exec handler,
and this client on the websocket (binary subprotocol).

- console: the serial console, interactive, with the local terminal in raw mode (keys such as
  Ctrl-C go to the guest); Ctrl-] detaches. It replays the scrollback first. It opens the
  console as `virsh console --force` does: a running agent's web viewers of this VM are
  disconnected (they are told another client took over).
- exec: the command's stdout and stderr go to ours, its exit code becomes ours; `-i` sends our
  stdin, `-t` asks for a terminal (see agent/streams/exec.py for what that means in a VM).
  Errors before the command runs exit 125, a timeout 124 (as timeout(1)). Ctrl-C sends SIGINT
  to the command; a second one leaves it running and exits 130.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import signal
import stat
import sys
import termios
import tty
from typing import Any, Self

from websockets.exceptions import ConnectionClosed

from agent.local import LocalSession, local_config
from agent.streams.client import StreamDenied, local_stream, messages
from drivers.base import DriverError

DETACH = b"\x1d"  # Ctrl-]


class _Input:
    """Our stdin as chunks: event-driven for terminals and pipes, plain reads for a regular file."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.regular = stat.S_ISREG(os.fstat(fd).st_mode)

    async def read(self) -> bytes:
        """The next chunk; b"" at end of file."""
        if not self.regular:
            loop = asyncio.get_running_loop()
            ready = loop.create_future()
            def wake() -> None:
                if not ready.done():
                    ready.set_result(None)

            loop.add_reader(self.fd, wake)
            try:
                await ready
            finally:
                loop.remove_reader(self.fd)
        return os.read(self.fd, 65536)


class _RawTerminal:
    """The local terminal in raw mode for the duration of a `with` (no-op when not a terminal)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.saved: Any = None

    def __enter__(self) -> Self:
        if os.isatty(self.fd):
            self.saved = termios.tcgetattr(self.fd)
            tty.setraw(self.fd)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.saved is not None:
            termios.tcsetattr(self.fd, termios.TCSADRAIN, self.saved)


class _NoTerminal:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _write(stream: Any, data: bytes) -> None:
    stream.buffer.write(data)
    stream.buffer.flush()


def _closed_reason(exc: ConnectionClosed) -> str:
    return exc.rcvd.reason if exc.rcvd and exc.rcvd.reason else "connection lost"


async def cmd_console(args: argparse.Namespace) -> int:
    from agent.streams.console import ConsoleHandler

    async with LocalSession(local_config(args)) as session:
        vm = await session.find(args.name)
        payload = {"container": vm.instance_uuid}
        try:
            async with local_stream(session.driver, session.config, "console", ConsoleHandler(session.driver),
                                    payload, binary=True, ttl=300) as ws:
                print(f"Connected to the console of {vm.name or vm.instance_uuid} (Ctrl-] detaches)", file=sys.stderr)
                return await _console_session(ws)
        except StreamDenied as exc:
            print(f"herdsman console: {exc.reason}", file=sys.stderr)
            return 1


async def _console_session(ws: Any) -> int:
    stdin = _Input(sys.stdin.fileno())

    async def show() -> int:
        try:
            async for message in messages(ws):
                _write(sys.stdout, message if isinstance(message, bytes) else message.encode())
        except ConnectionClosed as exc:
            print(f"\r\nherdsman console: {_closed_reason(exc)}\r", file=sys.stderr)
            return 1
        return 0

    async def type_() -> int:
        while data := await stdin.read():
            if DETACH in data:
                await ws.send(data.split(DETACH, 1)[0])
                return 0
            await ws.send(data)
        await asyncio.Future()  # stdin ended (a pipe): keep showing output until Ctrl-C
        return 0

    with _RawTerminal(sys.stdin.fileno()):
        tasks = [asyncio.ensure_future(show()), asyncio.ensure_future(type_())]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            code = next(iter(done)).result()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    print("\r\ndetached", file=sys.stderr)
    return code


async def cmd_exec(args: argparse.Namespace) -> int:
    from agent.streams.exec import ExecHandler

    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        print("herdsman exec: give the command after the VM's name: herdsman exec NAME -- CMD ARGS...", file=sys.stderr)
        return 125
    async with LocalSession(local_config(args)) as session:
        try:
            vm = await session.find(args.name)
        except DriverError as exc:
            print(f"herdsman exec: {exc}", file=sys.stderr)
            return 125
        payload = {"Cmd": cmd, "AttachStdin": args.interactive, "AttachStdout": True, "Tty": args.tty,
                   "Container": vm.instance_uuid}
        handler = ExecHandler(session.driver, timeout=args.timeout or 86400)
        try:
            async with local_stream(session.driver, session.config, "exec", handler, payload, binary=True,
                                    ttl=300) as ws:
                with _RawTerminal(sys.stdin.fileno()) if args.tty else _NoTerminal():
                    return await _exec_session(ws, interactive=args.interactive)
        except StreamDenied as exc:
            print(f"herdsman exec: {exc.reason}", file=sys.stderr)
            return 125


async def _exec_session(ws: Any, *, interactive: bool) -> int:
    """Output to ours, our stdin to the command; the exit code from the last frame or the close."""
    loop = asyncio.get_running_loop()
    code: int | None = None
    error: str | None = None

    async def feed() -> None:
        stdin = _Input(sys.stdin.fileno())
        while data := await stdin.read():
            await ws.send(data)
        await ws.send(json.dumps({"eof": True}))

    def on_sigint() -> None:
        # the protocol has no signal frame: hanging up sends the command SIGHUP, as a terminal would
        asyncio.ensure_future(ws.close())

    feeder = asyncio.ensure_future(feed()) if interactive else None
    loop.add_signal_handler(signal.SIGINT, on_sigint)
    try:
        async for message in messages(ws):
            if isinstance(message, bytes):
                _write(sys.stdout, message)
                continue
            frame = json.loads(message)
            if "stream" in frame:
                _write(sys.stderr, base64.b64decode(frame["data"]))
            elif "exit" in frame:
                code = int(frame["exit"])
            elif "error" in frame:
                error = str(frame["error"])
    except ConnectionClosed as exc:
        error = error or _closed_reason(exc)
    finally:
        loop.remove_signal_handler(signal.SIGINT)
        if feeder is not None:
            feeder.cancel()
            await asyncio.gather(feeder, return_exceptions=True)
    reason = ws.close_reason or ""
    if code is None and reason.startswith("exit "):
        code = int(reason.split()[1])
    if code is None:
        print(f"herdsman exec: {error or reason or 'interrupted'}", file=sys.stderr)
        return 124 if "timed out" in (error or reason) else (130 if not (error or reason) else 125)
    return code


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser], add_arguments: Any) -> None:
    """Register `console` and `exec` (agent/cli.py calls this next to agent.local.add_commands)."""
    console = sub.add_parser("console", help="the serial console of a VM, interactive (Ctrl-] detaches)")
    add_arguments(console)
    console.add_argument("name", help="the VM's name or uuid")
    console.set_defaults(async_func=cmd_console)

    run = sub.add_parser("exec", help="run a command in a VM through its guest agent: herdsman exec NAME -- CMD ARGS...")
    add_arguments(run)
    run.add_argument("-i", "--interactive", action="store_true", help="send our stdin to the command")
    run.add_argument("-t", "--tty", action="store_true", help="a terminal: the local one in raw mode, stderr merged")
    run.add_argument("--timeout", type=float, default=0, help="kill the command after this many seconds (default: none)")
    run.add_argument("name", help="the VM's name or uuid")
    run.add_argument("cmd", nargs=argparse.REMAINDER, help="-- then the command and its arguments")
    run.set_defaults(async_func=cmd_exec)
