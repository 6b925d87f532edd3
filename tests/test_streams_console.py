"""The console stream against the real test guest: serial console (shared by several viewers,
scrollback, 1 MiB intact, slow viewer dropped, VM restart survived, takeover) and VNC."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import time
from collections.abc import AsyncIterator
from typing import Any

import libvirt
import pytest
import pytest_asyncio
from websockets.exceptions import ConnectionClosed
from websockets.typing import Subprotocol

from agent.streams.console import ConsoleHandler
from drivers.libvirt.console_stream import ConsoleClosed, ConsoleHubs
from tests.console_exec_guest import (
    BootedGuest,
    StreamServer,
    booted_guest,
    decode,
    read_until,
)

pytestmark = [pytest.mark.libvirtd, pytest.mark.guest, pytest.mark.timeout(600),
              pytest.mark.asyncio(loop_scope="module")]

#: `seq 1 N` through the guest's tty (ONLCR turns each LF into CRLF): just over 1 MiB.
SEQ_N = 145_000
EXPECTED = b"".join(b"%d\r\n" % i for i in range(1, SEQ_N + 1))


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def guest() -> AsyncIterator[BootedGuest]:
    async with booted_guest("console") as booted:
        yield booted


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def handler(guest: BootedGuest) -> ConsoleHandler:
    return ConsoleHandler(guest.driver)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server(guest: BootedGuest, handler: ConsoleHandler) -> AsyncIterator[StreamServer]:
    async with StreamServer(handler, "console", guest.uuid) as srv:
        yield srv


async def type_line(ws: Any, line: str, binary: bool) -> None:
    data = line.encode() + b"\r"
    await ws.send(data if binary else base64.b64encode(data).decode())


async def shell_ready(ws: Any, buf: bytearray, binary: bool = True) -> None:
    """Wait until the guest's serial shell answers (it starts a moment after boot)."""
    for attempt in range(60):
        await type_line(ws, f"echo P$(({attempt}+1000))P", binary)
        try:
            await read_until(ws, b"P%dP\r\n" % (attempt + 1000), buf, timeout=2)
            return
        except AssertionError:
            continue
    raise AssertionError(f"the serial shell does not answer: ...{bytes(buf[-300:])!r}")


async def test_boot_output_arrives_and_the_shell_answers(guest: BootedGuest, server: StreamServer) -> None:
    async with server.connect() as ws:  # text frames with base64, as the Rancher UI
        assert ws.subprotocol is None
        seen = bytearray()
        await read_until(ws, b"HERDSMAN-GUEST: booted " + guest.kernel_version.encode(), seen, timeout=180)
        await read_until(ws, b"HERDSMAN-GUEST: ready", seen, timeout=180)
        print(f"\nboot: 'ready' on the console {time.monotonic() - guest.started:.1f} s after activate")
        await asyncio.sleep(1)  # the shell starts after the marker
        await type_line(ws, "echo $((6*7))", binary=False)
        out = await read_until(ws, b"\r\n42\r\n", seen)
        assert b"echo $((6*7))" in out  # the guest's tty echoed what was typed


async def test_three_viewers_share_one_session_and_one_leaving_changes_nothing(
        guest: BootedGuest, server: StreamServer, handler: ConsoleHandler) -> None:
    hubs = guest.driver.streams.hubs
    async with server.connect(binary=True) as a, server.connect(binary=True) as b, server.connect() as c:
        bufs = [bytearray(), bytearray(), bytearray()]
        await type_line(a, "echo V$((1+2))X", binary=True)
        for ws, buf in zip((a, b, c), bufs):
            await read_until(ws, b"V3X\r\n", buf)
        hub = hubs.hub(guest.uuid)
        assert hub is not None and hub.viewers == 3
        # A viewer that arrives now gets the scrollback, including what the others just saw.
        async with server.connect(binary=True) as late:
            replay = await read_until(late, b"V3X\r\n", bytearray(), timeout=5)
            assert b"echo V$((1+2))X" in replay
        await b.close()
        await asyncio.sleep(0.2)
        assert hub.viewers == 2 and hubs.hub(guest.uuid) is hub
        await type_line(c, "echo W$((2+3))Y", binary=False)  # input from any viewer
        for ws, buf in ((a, bufs[0]), (c, bufs[2])):
            await read_until(ws, b"W5Y\r\n", buf)
        # both saw exactly the same bytes since the moment the last one attached
        start = bufs[0].index(b"echo V$((1+2))X")
        assert bufs[0][start:bufs[0].index(b"W5Y\r\n")] == bufs[2][bufs[2].index(b"echo V$((1+2))X"):bufs[2].index(b"W5Y\r\n")]
    await asyncio.sleep(0.2)
    assert hubs.hub(guest.uuid) is None  # the last viewer left: the libvirt session is closed


async def _collect_seq(ws: Any, buf: bytearray, timeout: float = 300) -> tuple[bytes, float]:
    """The bytes between the S2S and E4E markers, and the seconds between the two markers."""
    await read_until(ws, b"S2S\r\n", buf, timeout=60)
    t0 = time.monotonic()
    await read_until(ws, b"E4E\r\n", buf, timeout=timeout)
    elapsed = time.monotonic() - t0
    start = buf.index(b"S2S\r\n") + len(b"S2S\r\n")
    return bytes(buf[start:buf.index(b"E4E\r\n", start)]), elapsed


async def _seq_through(server: StreamServer, viewers: int) -> float:
    conns = [await server.connect(binary=True).__aenter__() for _ in range(viewers)]
    try:
        await shell_ready(conns[0], bytearray())
        for ws in conns:  # drop the scrollback replay and the probe
            while True:
                try:
                    await asyncio.wait_for(ws.recv(), 0.3)
                except TimeoutError:
                    break
        await type_line(conns[0], f'echo "S$((1+1))S"; seq 1 {SEQ_N}; echo "E$((2+2))E"', binary=True)
        cpu = time.process_time()
        results = await asyncio.gather(*(_collect_seq(ws, bytearray()) for ws in conns))
        cpu = time.process_time() - cpu
    finally:
        for ws in conns:
            await ws.close()
    expected = hashlib.sha256(EXPECTED).hexdigest()
    for data, _ in results:
        assert len(data) == len(EXPECTED) and hashlib.sha256(data).hexdigest() == expected
    slowest = max(elapsed for _, elapsed in results)
    rate = len(EXPECTED) / slowest
    print(f"\nconsole: {len(EXPECTED)} bytes to {viewers} viewer(s) in {slowest:.2f} s = {rate / 1024:.0f} KiB/s "
          f"each; this process (agent and clients) used {cpu:.1f} s of CPU, load {os.getloadavg()[0]:.1f}")
    return rate


async def test_through_the_agent_stream_server_with_its_token(guest: BootedGuest) -> None:
    """compute.instance.console → {url, token} → the agent's own stream server (noVNC-style binary)."""
    from urllib.parse import quote

    from websockets.asyncio.client import connect

    url, token = await guest.grant("console")
    async with connect(f"{url}?token={quote(token)}", subprotocols=[Subprotocol("binary")]) as ws:
        assert ws.subprotocol == "binary"
        buf = bytearray()
        await shell_ready(ws, buf, binary=True)


async def test_a_mebibyte_arrives_complete_and_in_order_at_every_viewer(server: StreamServer) -> None:
    await _seq_through(server, 4)
    await _seq_through(server, 1)


async def test_a_viewer_that_does_not_read_is_dropped_and_the_others_continue(guest: BootedGuest) -> None:
    hubs = ConsoleHubs(guest.driver, viewer_budget=128 * 1024)
    stalled = await hubs.attach(guest.uuid)  # never reads
    reader = await hubs.attach(guest.uuid)
    try:
        await reader.write(b"seq 1 60000; echo D$((3+3))D\r")  # ~400 KB
        got = bytearray()
        while b"D6D\r\n" not in got:
            got += await asyncio.wait_for(reader.read(), 120)
        assert stalled.ended is not None and stalled.ended.reason == "slow"
        assert stalled.pending == 0  # its queue was freed
        with pytest.raises(ConsoleClosed) as info:
            await stalled.read()
        assert "behind" in str(info.value)
        hub = hubs.hub(guest.uuid)
        assert b"60000\r\n" in got and hub is not None and hub.viewers == 1
    finally:
        reader.close()
        stalled.close()
    assert hubs.hub(guest.uuid) is None


async def test_vnc_through_a_libvirt_passed_socket(guest: BootedGuest, server: StreamServer) -> None:
    async with server.connect({"kind": "vnc"}, binary=True) as ws:
        assert await asyncio.wait_for(ws.recv(), 10) == b"RFB 003.008\n"
        await ws.send(b"RFB 003.008\n")
        assert await asyncio.wait_for(ws.recv(), 10) == b"\x01\x01"  # one security type: None
    # Without skipping auth, qemu asks for the domain's VNC password (type 2, VNC authentication).
    guest.driver.streams.vnc_skip_auth = False
    try:
        async with server.connect({"kind": "vnc"}) as ws:
            assert decode(await asyncio.wait_for(ws.recv(), 10)) == b"RFB 003.008\n"  # base64 text frames work too
            await ws.send(base64.b64encode(b"RFB 003.008\n").decode())
            assert decode(await asyncio.wait_for(ws.recv(), 10)) == b"\x01\x02"
    finally:
        guest.driver.streams.vnc_skip_auth = True


async def test_bad_frames_and_kinds_are_refused(server: StreamServer) -> None:
    async with server.connect({"kind": "spice"}) as ws:
        with pytest.raises(ConnectionClosed):
            await ws.recv()
        assert ws.close_code == 1008 and "unknown console kind" in ws.close_reason
    async with server.connect() as ws:
        await ws.send("not base64!")
        with pytest.raises(ConnectionClosed):
            while True:
                await ws.recv()
        assert ws.close_code == 1007


async def test_the_console_survives_a_reboot_and_a_restart_of_the_vm(
        guest: BootedGuest, server: StreamServer, handler: ConsoleHandler) -> None:
    hubs = guest.driver.streams.hubs
    async with server.connect(binary=True) as ws:
        buf = bytearray()
        await asyncio.sleep(0.5)
        hub = hubs.hub(guest.uuid)
        assert hub is not None
        await shell_ready(ws, buf)
        # inside the guest: a reboot keeps the qemu process and the libvirt stream
        await type_line(ws, "/sbin/shutdown -r", binary=True)
        await read_until(ws, b"HERDSMAN-GUEST: reboot", buf, timeout=60)
        await read_until(ws, b"HERDSMAN-GUEST: ready", buf, timeout=180)
        assert hub.reopened == 0
        # from the host: stop + start is a new qemu process; the stream ends and is reopened
        started = time.monotonic()
        await guest.driver.restart_vm(guest.uuid, 0)
        buf = bytearray()  # only what arrives after the restart
        await read_until(ws, b"HERDSMAN-GUEST: booted", buf, timeout=180)
        await read_until(ws, b"HERDSMAN-GUEST: ready", buf, timeout=180)
        print(f"\nrestart: console back, 'ready' {time.monotonic() - started:.1f} s after restart_vm")
        assert hub.reopened == 1 and hubs.hub(guest.uuid) is hub
        await shell_ready(ws, buf)


CLI = ("import sys, argparse\n"
       "from agent.config import add_arguments\n"
       "from agent.streams.cli_console import add_commands\n"
       "from agent.cli import cmd_local\n"
       "p = argparse.ArgumentParser(); sub = p.add_subparsers(dest='command')\n"
       "add_commands(sub, add_arguments)\n"
       "sys.exit(cmd_local(p.parse_args(sys.argv[1:])))\n")


async def test_herdsman_console_in_a_terminal(guest: BootedGuest) -> None:
    """`herdsman console NAME` in a real pseudo-terminal: raw keys reach the guest, Ctrl-] detaches."""
    import os
    import pty
    import sys

    from tests.agent_harness import REPO

    root = guest.root
    master, slave = pty.openpty()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CLI, "console", "--libvirt-uri", "qemu:///system", "--domain-type", "qemu",
        "--state-dir", str(root / "state"), "--log-dir", str(root / "log"), "--storage-pool", f"hmtest-{root.name}",
        guest.name, cwd=REPO, stdin=slave, stdout=slave, stderr=slave, start_new_session=True)
    os.close(slave)
    os.set_blocking(master, False)
    screen = bytearray()

    async def expect(needle: bytes, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while needle not in screen:
            if time.monotonic() > deadline:
                raise AssertionError(f"{needle!r} not on the terminal: ...{bytes(screen[-400:])!r}")
            try:
                screen.extend(os.read(master, 65536))
            except BlockingIOError:
                await asyncio.sleep(0.05)
            except OSError:  # EIO: the process closed the terminal
                await asyncio.sleep(0.05)

    try:
        await expect(b"(Ctrl-] detaches)")
        for attempt in range(30):  # the guest's shell may still be starting
            os.write(master, f"echo C$(({attempt}+100))C\r".encode())
            try:
                await expect(b"C%dC\r\n" % (attempt + 100), timeout=2)
                break
            except AssertionError:
                continue
        os.write(master, b"\x03")  # Ctrl-C goes to the guest (raw mode), not to herdsman
        os.write(master, b"echo still-$((1+1))\r")
        await expect(b"still-2\r\n")
        os.write(master, b"\x1d")
        assert await asyncio.wait_for(proc.wait(), 30) == 0
        await expect(b"detached")
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        os.close(master)


async def test_another_client_forcing_the_console_ends_the_viewers(guest: BootedGuest, server: StreamServer) -> None:
    async with server.connect(binary=True) as ws:
        await asyncio.sleep(0.5)
        conn = libvirt.open("qemu:///system")  # like `virsh console --force` from another shell
        try:
            stream = conn.newStream(0)
            conn.lookupByUUIDString(guest.uuid).openConsole(None, stream, libvirt.VIR_DOMAIN_CONSOLE_FORCE)
            with pytest.raises(ConnectionClosed):
                while True:
                    await asyncio.wait_for(ws.recv(), 30)
            assert ws.close_code == 1011 and "another client" in ws.close_reason
            stream.abort()
        finally:
            conn.close()
