"""The exec stream against the real test guest through qemu-guest-agent: output, stderr and exit
codes, streamed output, stdin, TTY (emulated and a real pty), a missing command, a timeout, a
guest without an agent, and the `herdsman exec` command's exit code."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import pytest_asyncio
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from agent.streams.exec import ExecHandler, LineDiscipline, crlf
from drivers.libvirt.guest_agent import GuestAgent, GuestProcess
from tests.agent_harness import REPO
from tests.console_exec_guest import BootedGuest, StreamServer, booted_guest, decode

pytestmark = [pytest.mark.libvirtd, pytest.mark.guest, pytest.mark.timeout(600),
              pytest.mark.asyncio(loop_scope="module")]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def guest() -> AsyncIterator[BootedGuest]:
    async with booted_guest("exec") as booted:
        await booted.wait_log("HERDSMAN-GUEST: ready")
        yield booted


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server(guest: BootedGuest) -> AsyncIterator[StreamServer]:
    async with StreamServer(ExecHandler(guest.driver), "exec", guest.uuid) as srv:
        yield srv


class Result:
    def __init__(self) -> None:
        self.stdout = bytearray()
        self.stderr = bytearray()
        self.controls: list[dict[str, Any]] = []
        self.arrivals: list[tuple[float, bytes]] = []
        self.close_code: int | None = None
        self.close_reason = ""

    @property
    def exit(self) -> int | None:
        codes = [c["exit"] for c in self.controls if "exit" in c]
        return codes[-1] if codes else None

    @property
    def error(self) -> str | None:
        errors = [c["error"] for c in self.controls if "error" in c]
        return errors[-1] if errors else None


async def collect(ws: Any, result: Result, *, tty: bool = False) -> Result:
    """Read every frame until the close, sorting data from control frames (see agent/streams/exec.py)."""
    try:
        while True:
            message = await asyncio.wait_for(ws.recv(), 120)
            if isinstance(message, str) and message.startswith("{") and not tty:
                control = json.loads(message)
                if control.get("stream") == "stderr":
                    result.stderr += base64.b64decode(control["data"])
                else:
                    result.controls.append(control)
                continue
            data = decode(message)
            result.stdout += data
            result.arrivals.append((time.monotonic(), data))
    except ConnectionClosed:
        pass
    result.close_code, result.close_reason = ws.close_code, ws.close_reason
    return result


def exec_payload(cmd: list[str], **fields: Any) -> dict[str, Any]:
    return {"Cmd": cmd, "AttachStdin": False, "AttachStdout": True, "Tty": False, **fields}


async def run(server: StreamServer, cmd: list[str], *, binary: bool = False, **fields: Any) -> Result:
    async with server.connect(exec_payload(cmd, **fields), binary=binary) as ws:
        return await collect(ws, Result())


async def test_uname_returns_the_guest_kernel_version(guest: BootedGuest, server: StreamServer) -> None:
    result = await run(server, ["uname", "-r"], binary=True)
    assert bytes(result.stdout) == guest.kernel_version.encode() + b"\n"
    assert result.exit == 0 and result.stderr == b""
    assert (result.close_code, result.close_reason) == (1000, "exit 0")


async def test_stdout_stderr_and_exit_code_are_kept_apart(server: StreamServer) -> None:
    result = await run(server, ["sh", "-c", "echo out; echo err >&2; exit 3"])  # base64 text frames
    assert (bytes(result.stdout), bytes(result.stderr), result.exit) == (b"out\n", b"err\n", 3)
    assert (result.close_code, result.close_reason) == (1000, "exit 3")
    quiet = await run(server, ["sh", "-c", "echo out; echo err >&2; exit 2"], AttachStdout=False)
    assert (bytes(quiet.stdout), bytes(quiet.stderr), quiet.exit) == (b"", b"", 2)


async def test_arguments_reach_the_command_unchanged(server: StreamServer) -> None:
    tricky = ["$(reboot)", "a b", "'\"", "; exit 9", "*", "\\n", "é"]
    result = await run(server, ["printf", "[%s]\\n", *tricky], binary=True)
    assert bytes(result.stdout).decode() == "".join(f"[{a}]\n" for a in tricky) and result.exit == 0


async def test_output_streams_while_the_command_runs(server: StreamServer) -> None:
    result = await run(server, ["sh", "-c", "echo first; sleep 2; echo second"], binary=True)
    assert bytes(result.stdout) == b"first\nsecond\n" and result.exit == 0
    first = next(t for t, d in result.arrivals if b"first" in d)
    second = next(t for t, d in result.arrivals if b"second" in d)
    assert second - first > 1.5  # "first" was delivered while the command slept


async def test_stdin_reaches_cat_and_comes_back(server: StreamServer) -> None:
    async with server.connect(exec_payload(["cat"], AttachStdin=True), binary=True) as ws:
        await ws.send(b"hello\n")
        await ws.send(base64.b64encode(b"\x00\xffbinary too\n").decode())  # text frames are base64
        await ws.send(json.dumps({"eof": True}))
        result = await collect(ws, Result())
    assert bytes(result.stdout) == b"hello\n\x00\xffbinary too\n" and result.exit == 0


async def test_stdin_larger_than_a_pipe_waits_for_a_slow_reader_and_loses_nothing(server: StreamServer) -> None:
    data = hashlib.sha256(b"seed").digest() * 8192  # 256 KiB, four times a pipe's capacity
    async with server.connect(exec_payload(["sh", "-c", "sleep 1; sha256sum"], AttachStdin=True),
                              binary=True) as ws:
        started = time.monotonic()
        for i in range(0, len(data), 16384):
            await ws.send(data[i:i + 16384])
        await ws.send(json.dumps({"eof": True}))
        result = await collect(ws, Result())
    print(f"\nexec stdin: {len(data)} bytes through a slow reader in {time.monotonic() - started:.2f} s")
    assert bytes(result.stdout).split()[0].decode() == hashlib.sha256(data).hexdigest() and result.exit == 0


async def test_a_command_that_does_not_exist(server: StreamServer) -> None:
    result = await run(server, ["no-such-command", "x"])
    assert (result.exit, bytes(result.stderr)) == (127, b"no-such-command: command not found\n")


async def test_a_command_that_runs_too_long_is_killed(guest: BootedGuest) -> None:
    async with StreamServer(ExecHandler(guest.driver, timeout=2), "exec", guest.uuid) as srv:
        started = time.monotonic()
        result = await run(srv, ["sh", "-c", "echo started; exec sleep 300"])
        assert time.monotonic() - started < 10
    assert bytes(result.stdout) == b"started\n"
    assert result.error == "timed out after 2 s; the command was killed" and result.exit is None
    assert result.close_code == 1011 and "timed out" in result.close_reason
    agent = GuestAgent(await guest.driver.domain(guest.uuid))
    _, out = await agent.run(["/bin/sh", "-c", "pidof sleep || true"])
    assert out.strip() == b""  # the sleep is gone, not orphaned in the guest
    _, out = await agent.run(["/bin/sh", "-c", "ls -a /tmp"])
    assert b"herdsman-exec" not in out  # and nothing was left behind in /tmp


async def test_a_bad_request_is_refused(server: StreamServer) -> None:
    result = await run(server, [])
    assert result.close_code == 1008 and result.error == "Cmd must be a non-empty list of strings"


async def test_tty_without_a_guest_terminal_is_emulated(server: StreamServer) -> None:
    async with server.connect(exec_payload(["sh"], AttachStdin=True, Tty=True)) as ws:  # the Rancher UI way
        await ws.send(base64.b64encode(b"echo $((6*8))\r").decode())
        screen = bytearray()
        while b"48\r\n" not in screen:
            screen += decode(await asyncio.wait_for(ws.recv(), 30))
        assert screen == b"echo $((6*8))\r\n48\r\n"  # echoed by the agent, then the answer with CRLF
        await ws.send(base64.b64encode(b"exit 4x\x7f\r").decode())  # Backspace edits the line
        result = await collect(ws, Result(), tty=True)
    assert bytes(result.stdout) == b"exit 4x\b \b\r\n"
    assert (result.close_code, result.close_reason) == (1000, "exit 4")


async def test_tty_with_util_linux_script_in_the_guest_is_a_real_terminal(guest: BootedGuest,
                                                                          server: StreamServer) -> None:
    """The guest image has no `script`; copy the host's util-linux one in (it needs only libc)."""
    agent = GuestAgent(await guest.driver.domain(guest.uuid))
    binary = Path("/usr/bin/script").read_bytes()
    handle = await agent.open("/usr/bin/script", "w")
    for i in range(0, len(binary), 32768):
        await agent.write(handle, binary[i:i + 32768])
    await agent.close(handle)
    assert (await agent.run(["chmod", "755", "/usr/bin/script"]))[0] == 0
    try:
        tricky = "a'b $(echo no) \"c\" ;x"  # script -c takes one command line: it must arrive quoted
        cmd = ["sh", "-c", 'printf "[%s]\\n" "$1"; exec sh', "sh", tricky]
        async with server.connect(exec_payload(cmd, AttachStdin=True, Tty=True), binary=True) as ws:
            await ws.send(b"tty; echo $((6*9))\r")
            screen = bytearray()
            while b"54\r\n" not in screen:
                screen += decode(await asyncio.wait_for(ws.recv(), 30))
            assert f"[{tricky}]\r\n".encode() in screen
            assert b"/dev/pts/" in screen  # the command has a terminal in the guest
            await ws.send(b"exit 5\r")
            result = await collect(ws, Result(), tty=True)
        assert (result.close_code, result.close_reason) == (1000, "exit 5")
    finally:
        await agent.run(["rm", "-f", "/usr/bin/script"])


async def test_through_the_agent_stream_server_with_its_token(guest: BootedGuest) -> None:
    """compute.instance.execute → {url, token} → the agent's own stream server → this handler."""
    url, token = await guest.grant("execute", command=["sh", "-c", "echo via-agent; exit 6"], tty=False,
                                   attachStdin=False)
    async with connect(f"{url}?token={quote(token)}") as ws:  # the Rancher UI's way: ?token=, text frames
        result = await collect(ws, Result())
    assert (bytes(result.stdout), result.exit, result.close_reason) == (b"via-agent\n", 6, "exit 6")


async def test_round_trip_of_true(guest: BootedGuest, server: StreamServer) -> None:
    def ms(values: list[float]) -> str:
        return (f"median {statistics.median(values) * 1000:.0f} ms, min {min(values) * 1000:.0f} ms, "
                f"max {max(values) * 1000:.0f} ms (n={len(values)})")

    times = []
    for _ in range(10):
        started = time.monotonic()
        result = await run(server, ["true"], binary=True)
        times.append(time.monotonic() - started)
        assert result.exit == 0
    agent = GuestAgent(await guest.driver.domain(guest.uuid))
    direct, pings = [], []
    for _ in range(10):
        started = time.monotonic()
        process = GuestProcess(agent, ["true"])
        await process.start()
        async for _stream in process.output():
            pass
        await process.close()
        direct.append(time.monotonic() - started)
        started = time.monotonic()
        await agent.call("guest-ping")
        pings.append(time.monotonic() - started)
    print(f"\nexec `true` over a new websocket: {ms(times)}\n"
          f"exec `true` without the websocket: {ms(direct)}\none QGA call (guest-ping): {ms(pings)}")


async def test_herdsman_exec_passes_the_exit_code_through(guest: BootedGuest) -> None:
    """The CLI in its own process, with its own libvirt connection, finds the VM by name."""
    root = guest.root
    code = ("import sys, argparse\n"
            "from agent.config import add_arguments\n"
            "from agent.streams.cli_console import add_commands\n"
            "from agent.cli import cmd_local\n"
            "p = argparse.ArgumentParser(); sub = p.add_subparsers(dest='command')\n"
            "add_commands(sub, add_arguments)\n"
            "sys.exit(cmd_local(p.parse_args(sys.argv[1:])))\n")
    options = ["--libvirt-uri", "qemu:///system", "--domain-type", "qemu", "--state-dir", str(root / "state"),
               "--log-dir", str(root / "log"), "--storage-pool", f"hmtest-{root.name}"]
    args = ["exec", *options, guest.name, "--", "sh", "-c", "echo to-stdout; echo to-stderr >&2; exit 7"]
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", code, *args, cwd=REPO,
                                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    stdout, stderr = await asyncio.wait_for(proc.communicate(), 120)
    assert (proc.returncode, stdout, stderr) == (7, b"to-stdout\n", b"to-stderr\n"), stderr
    # -i with stdin from a regular file
    data = (guest.root / "stdin.bin")
    data.write_bytes(bytes(range(256)) * 64)
    with data.open("rb") as stdin:
        proc = await asyncio.create_subprocess_exec(sys.executable, "-c", code, "exec", *options, "-i", guest.name,
                                                    "--", "sha256sum", cwd=REPO, stdin=stdin,
                                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        stdout, stderr = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0 and stdout.split()[0].decode() == hashlib.sha256(data.read_bytes()).hexdigest(), stderr


async def test_a_guest_without_an_agent_gets_a_clear_message(guest: BootedGuest, server: StreamServer) -> None:
    """Last: it stops the guest agent."""
    agent = GuestAgent(await guest.driver.domain(guest.uuid))
    await agent.exec("/bin/sh", ["-c", "kill $(cat /run/qemu-ga.pid)"])
    for _ in range(50):
        if await agent.connected() is False:
            break
        await asyncio.sleep(0.1)
    result = await run(server, ["uname", "-r"])
    assert result.error == "the guest agent is not running in this VM"
    assert (result.close_code, result.close_reason) == (1011, "the guest agent is not running in this VM")
    async with server.connect(exec_payload(["sh"], Tty=True, AttachStdin=True)) as ws:
        tty_result = await collect(ws, Result(), tty=True)  # a terminal gets it as text
    assert b"herdsman: the guest agent is not running in this VM" in tty_result.stdout


async def test_line_discipline_edits_like_a_terminal() -> None:
    d = LineDiscipline()
    keys = b"ab\x1b[Dc\x7f\x7f" + "é".encode() + b"\x7fz\r"  # ESC [ D: an arrow key, ignored
    assert d.feed(keys) == [("echo", b"abc\b \b\b \b\xc3\xa9\b \bz\r\n"), ("input", b"az\n")]
    assert d.feed(b"x\x03") == [("echo", b"x^C\r\n"), ("signal", b"INT")]
    assert d.feed(b"\x04") == [("eof", b"")]
    assert crlf(b"a\nb\r\nc\r", False) == (b"a\r\nb\r\nc\r", True) and crlf(b"\nd", True) == (b"\nd", False)
