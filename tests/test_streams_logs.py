"""The logs stream: last N lines and follow, on files, through the agent, and on the real guest."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import libvirt
import pytest
import pytest_asyncio

from agent.streams.client import messages, open_stream
from agent.streams.logs import BLOCK, LogFollower, last_lines
from tests.agent_harness import REPO, instance_event, running_agent, vm_instance
from tests.streams_vm import NetGuest, net_guest

pytestmark = pytest.mark.timeout(600)
#: every async test here runs on the module's loop, where the shared guest's agent lives
on_module_loop = pytest.mark.asyncio(loop_scope="module")


def tail(path: Path, count: int) -> list[bytes]:
    """The oracle: coreutils tail, line endings removed."""
    out = subprocess.run(["tail", "-n", str(count), str(path)], capture_output=True, check=True).stdout
    lines = out.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    return [line.removesuffix(b"\r") for line in lines]


def read_last(path: Path, count: int) -> list[bytes]:
    with open(path, "rb") as f:
        return last_lines(f, path, count)[0]


# -- last N lines ----------------------------------------------------------------------------------
@pytest.mark.parametrize("content", [
    b"", b"one\n", b"one", b"a\nb\nc\n", b"a\r\nb\r\nc\r\n", b"a\nb\nprompt # ", b"\n\n\n", b"x\n\ny\n",
])
@pytest.mark.parametrize("count", [0, 1, 2, 5])
def test_last_lines_is_tail(tmp_path, content, count) -> None:
    path = tmp_path / "console.log"
    path.write_bytes(content)
    assert read_last(path, count) == (tail(path, count) if count else [])


def test_last_lines_of_a_large_file_reads_only_the_end(tmp_path) -> None:
    rng = random.Random(7)
    path = tmp_path / "console.log"
    lines = [bytes(rng.choice(b"abcdefgh \t") for _ in range(rng.choice([0, 5, 80, 300, 5000]))) for _ in range(3000)]
    lines[2990] = b"L" * (3 * BLOCK)  # one line longer than several blocks
    path.write_bytes(b"\r\n".join(lines) + b"\r\n")
    for count in (1, 7, 10, 11, 500, 2999, 3000, 5000):
        assert read_last(path, count) == tail(path, count), count
    with open(path, "rb") as f:
        _, offset = last_lines(f, path, 3)
    assert offset == path.stat().st_size


def test_last_lines_continue_into_rotated_files(tmp_path) -> None:
    """virtlogd rotates by size, so a line can be split between .log.0 and the new file."""
    path = tmp_path / "console.log"
    (tmp_path / "console.log.1").write_bytes(b"r1-a\nr1-b\n")
    (tmp_path / "console.log.0").write_bytes(b"r0-a\nr0-b\nr0-split-")
    path.write_bytes(b"here\ncur-a\ncur-b\n")
    assert read_last(path, 2) == [b"cur-a", b"cur-b"]
    assert read_last(path, 4) == [b"r0-b", b"r0-split-here", b"cur-a", b"cur-b"]
    assert read_last(path, 100) == [b"r1-a", b"r1-b", b"r0-a", b"r0-b", b"r0-split-here", b"cur-a", b"cur-b"]


# -- following a file ------------------------------------------------------------------------------
async def take(lines: AsyncIterator[bytes], count: int, timeout: float = 5) -> list[bytes]:
    out: list[bytes] = []
    async with asyncio.timeout(timeout):
        while len(out) < count:
            out.append(await anext(lines))
    return out


def append(path: Path, data: bytes) -> None:
    with open(path, "ab") as f:
        f.write(data)


def rotate(path: Path) -> None:
    """What virtlogd does: shift .N → .N+1, rename the file to .0, start a new one."""
    rotated = sorted(path.parent.glob(f"{path.name}.*"), key=lambda p: int(p.suffix[1:]), reverse=True)
    for old in rotated:
        old.rename(path.with_name(f"{path.name}.{int(old.suffix[1:]) + 1}"))
    path.rename(path.with_name(f"{path.name}.0"))
    path.write_bytes(b"")


@on_module_loop
async def test_follower_survives_rotation_and_truncation_without_loss_or_repeat(tmp_path) -> None:
    path = tmp_path / "console.log"
    path.write_bytes(b"old\n")
    handle = open(path, "rb")
    follower = LogFollower(path, handle, path.stat().st_size, poll_interval=0.02, partial_after=10)
    lines = follower.lines()
    try:
        append(path, b"1\n2\n")
        assert await take(lines, 2) == [b"1", b"2"]
        # the old file gets its last bytes after the rename (a write in flight), then a new one
        old_fd = open(path, "ab")
        rotate(path)
        old_fd.write(b"3\nsplit-")
        old_fd.close()
        append(path, b"line\n4\n")
        assert await take(lines, 3) == [b"3", b"split-line", b"4"]
        # rotated twice while the reader was not looking: it still reads each file in order
        append(path, b"5\n")
        rotate(path)
        append(path, b"6\n")
        rotate(path)
        append(path, b"7\n")
        assert await take(lines, 3) == [b"5", b"6", b"7"]
        # truncated in place (copytruncate style) while the follower polls: read again from the start
        pending = asyncio.ensure_future(take(lines, 1))
        await asyncio.sleep(0.1)
        with open(path, "r+b") as f:
            f.truncate(0)
        await asyncio.sleep(0.1)
        append(path, b"8\n")
        assert await pending == [b"8"]
        with pytest.raises(TimeoutError):
            await take(lines, 1, timeout=0.3)  # nothing repeated
    finally:
        await lines.aclose()
        follower.close()


@on_module_loop
async def test_follower_waits_for_a_log_that_does_not_exist_yet_and_flushes_a_prompt(tmp_path) -> None:
    path = tmp_path / "console.log"
    follower = LogFollower(path, None, 0, poll_interval=0.02, partial_after=0.2)
    lines = follower.lines()
    try:
        await asyncio.sleep(0.1)
        path.write_bytes(b"booted\n~ # ")
        started = time.monotonic()
        assert await take(lines, 2) == [b"booted", b"~ # "]
        assert time.monotonic() - started >= 0.2  # the prompt waited for its newline first
        append(path, "ls \u00e9\n".encode())
        assert await take(lines, 1) == ["ls \u00e9".encode()]
    finally:
        await lines.aclose()
        follower.close()


# -- through the agent (libvirt test driver; the test writes the log the way virtlogd does) ----------
async def logs_grant(ctl, instance, **process) -> tuple[str, str]:
    reply = await instance_event(ctl, "logs", instance, process=process)
    assert reply.get("transitioning") is None, reply.get("transitioningMessage")
    body = reply["data"]["instanceHostMap"]
    return body["url"], body["token"]


@on_module_loop
async def test_logs_stream_follows_across_rotation(tmp_path) -> None:
    async with running_agent(tmp_path, stream_listen="127.0.0.1:0") as (ctl, agent):
        inst = vm_instance("logs-rotation")
        await instance_event(ctl, "activate", inst)
        log = tmp_path / "log" / "console" / f"{inst['uuid']}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_bytes(b"".join(b"line %d\r\n" % i for i in range(1, 11)))
        url, token = await logs_grant(ctl, inst, lines=3, follow=True)
        assert url == f"ws://127.0.0.1:{agent.streams.port}/v1/logs/"
        async with open_stream(url, token) as ws:
            stream = messages(ws)
            assert await take(stream, 3) == ["00 line 8", "00 line 9", "00 line 10"]
            append(log, b"line 11\r\n")
            assert await take(stream, 1) == ["00 line 11"]
            rotate(log)
            append(log.with_name(log.name + ".0"), b"line 12\r\n")  # virtlogd's last write to the old file
            append(log, b"line 13\r\nline 14\r\n")
            assert await take(stream, 3) == ["00 line 12", "00 line 13", "00 line 14"]
            with pytest.raises(TimeoutError):
                await take(stream, 1, timeout=0.6)  # no line sent twice
        # a client that closes ends the stream on the agent's side too (no follower left behind)
        await asyncio.sleep(0.3)
        handler_parts = {"_send_lines", "LogsHandler._stream", "LogsHandler._follow", "LogsHandler._until_gone",
                         "_drain_client"}
        assert not [t for t in asyncio.all_tasks() if t.get_coro().__qualname__ in handler_parts]
        await instance_event(ctl, "purge", inst)


# -- the real guest ------------------------------------------------------------------------------------
USERDATA = """#!/bin/sh
i=0
while [ $i -lt 40 ]; do i=$((i+1)); echo "LOGLINE $i of 40"; done
( n=0; while [ $n -lt 300 ]; do n=$((n+1)); sleep 2; echo "LATE-LINE $n"; done ) &
echo LOGS-USERDATA-DONE
"""


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def guest() -> AsyncIterator[NetGuest]:
    async with net_guest("logs-guest", USERDATA, ready_marker="HERDSMAN-GUEST: ready") as booted:
        yield booted


async def stable_read(path: Path, read) -> tuple[list, list[bytes]]:
    """Run `read` while the guest is not writing (size equal before and after); with the oracle."""
    for _ in range(10):
        before = path.stat().st_size
        got = await read()
        expected = tail(path, 5)
        if path.stat().st_size == before:
            return got, expected
        await asyncio.sleep(0.3)
    raise AssertionError("the guest never stopped writing long enough")


@on_module_loop
@pytest.mark.libvirtd
@pytest.mark.guest
async def test_guest_last_5_lines_exactly(guest: NetGuest) -> None:
    await wait_late_line(guest.log)

    async def read() -> list:
        url, token = await logs_grant(guest.ctl, guest.instance, lines=5, follow=False)
        async with open_stream(url, token) as ws:
            return [m async for m in messages(ws)]  # the stream ends by itself without follow

    got, expected = await stable_read(guest.log, read)
    assert got == ["00 " + line.decode(errors="replace") for line in expected]
    assert len(got) == 5


async def wait_late_line(path: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while b"LATE-LINE" not in path.read_bytes():
        assert time.monotonic() < deadline, "the guest's background writer never started"
        await asyncio.sleep(0.2)


@on_module_loop
@pytest.mark.libvirtd
@pytest.mark.guest
async def test_guest_follow_delivers_new_lines_within_a_second(guest: NetGuest) -> None:
    url, token = await logs_grant(guest.ctl, guest.instance, lines=0, follow=True)
    appeared: dict[str, float] = {}
    received: dict[str, float] = {}

    async def watch_file() -> None:
        """When each LATE-LINE reaches the file, seen by polling every 5 ms."""
        offset = guest.log.stat().st_size
        while True:
            data = guest.log.read_bytes()[offset:]
            now = time.monotonic()
            for line in data.decode(errors="replace").split("\n"):
                if line.startswith("LATE-LINE") and line.endswith("\r"):
                    appeared.setdefault(line.strip(), now)
            await asyncio.sleep(0.005)

    watcher = asyncio.create_task(watch_file())
    try:
        async with open_stream(url, token) as ws:
            async with asyncio.timeout(30):
                async for message in messages(ws):
                    if message.startswith("00 LATE-LINE"):
                        received[message[3:]] = time.monotonic()
                    if len(received) >= 4:
                        break
    finally:
        watcher.cancel()
    latencies = sorted(received[line] - appeared[line] for line in received if line in appeared)
    print(f"\nlogs follow latency (file → client), {len(latencies)} lines: "
          + ", ".join(f"{x * 1000:.0f} ms" for x in latencies))
    assert len(latencies) >= 3
    assert max(latencies) < 1.0, latencies


@on_module_loop
@pytest.mark.libvirtd
@pytest.mark.guest
async def test_herdsman_logs_cli(guest: NetGuest) -> None:
    base = [sys.executable, "-m", "agent", "logs", "logs-guest", "--libvirt-uri", "qemu:///system",
            "--state-dir", str(guest.dirs["state_dir"]), "--log-dir", str(guest.dirs["log_dir"]),
            "--storage-pool", guest.dirs["storage_pool"]]

    async def read() -> list:
        proc = await asyncio.create_subprocess_exec(*base, "-n", "5", cwd=REPO, stdout=subprocess.PIPE,
                                                    stderr=subprocess.PIPE)
        out, err = await proc.communicate()
        assert proc.returncode == 0, err.decode()
        return out.split(b"\n")[:-1]

    got, expected = await stable_read(guest.log, read)
    assert got == [line.decode(errors="replace").encode() for line in expected]

    proc = await asyncio.create_subprocess_exec(*base, "-f", "-n", "0", cwd=REPO, stdout=subprocess.PIPE,
                                                stderr=subprocess.PIPE)
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), 30)
        assert line.startswith(b"LATE-LINE"), line
    finally:
        proc.send_signal(signal.SIGINT)
        await asyncio.wait_for(proc.wait(), 30)
    assert proc.returncode == 0


@contextlib.contextmanager
def typed_on_serial_console(guest: NetGuest, line: str) -> Iterator[None]:
    """Type a line into the guest's serial shell (virDomainOpenConsole, as `virsh console`
    does). The console stays open until the block ends: closed at once, libvirtd may drop
    bytes it has not yet written to the pty."""
    conn = libvirt.open(guest.agent.driver.uri)
    dom = conn.lookupByUUIDString(guest.uuid)
    stream = conn.newStream(0)
    dom.openConsole(None, stream, libvirt.VIR_DOMAIN_CONSOLE_FORCE)
    try:
        stream.send(line.encode() + b"\r")
        yield
    finally:
        stream.abort()
        conn.close()


@on_module_loop
@pytest.mark.libvirtd
@pytest.mark.guest
async def test_guest_log_is_followed_across_a_real_virtlogd_rotation(guest: NetGuest) -> None:
    """The guest prints ~2.1 MiB (~25 s at TCG serial speed); virtlogd (max_size 2 MiB by
    default) renames the log to .log.0 and starts a new one while the stream follows: the stream
    carries exactly the lines of the files, once each, in order.

    The oracle is the files themselves, not the numbers 1..N: the guest's background LATE-LINE
    writer shares the serial port and may land inside a BULK line."""
    count = 27000
    rotated = guest.log.with_name(guest.log.name + ".0")
    assert not rotated.exists()
    offset = guest.log.stat().st_size
    url, token = await logs_grant(guest.ctl, guest.instance, lines=0, follow=True)
    bulk = re.compile(r"BULK (\d+) x")
    streamed: list[int] = []
    async with open_stream(url, token) as ws:
        started = time.monotonic()
        with typed_on_serial_console(guest, f"seq 1 {count} | sed 's/.*/BULK & {'x' * 70}/'"):
            async with asyncio.timeout(300):
                async for message in messages(ws):
                    streamed += [int(n) for n in bulk.findall(message)]
                    if f"BULK {count} " in message or (streamed and streamed[-1] > count - 100 and ":/# " in message):
                        break
        seconds = time.monotonic() - started
    print(f"\n{count} lines ({count * 83 / (1 << 20):.1f} MiB) followed across virtlogd's rotation in {seconds:.1f} s")
    assert rotated.exists(), "virtlogd did not rotate (max_size changed in /etc/libvirt/virtlogd.conf?)"
    files = sorted(guest.log.parent.glob(guest.log.name + ".*"), key=lambda p: int(p.suffix[1:]), reverse=True)
    written = b"".join(p.read_bytes() for p in files)[offset:] + guest.log.read_bytes()
    in_files = [int(n) for line in written.split(b"\n") for n in bulk.findall(line.decode(errors="replace"))]
    assert streamed == in_files[:len(streamed)] and len(streamed) >= len(in_files) - 5
    assert len(streamed) > count - 20 and len(set(streamed)) == len(streamed)


@on_module_loop
@pytest.mark.libvirtd
@pytest.mark.guest
async def test_logs_of_an_unknown_vm_are_refused_in_the_handshake(guest: NetGuest) -> None:
    from agent.config import secret
    from agent.streams.auth import mint_local
    from agent.streams.client import StreamDenied

    other = "0" * 8 + "-0000-4000-8000-" + "0" * 12
    token = mint_local(secret(guest.agent.config, "streams"), guest.agent.host_uuid, "logs", {"Container": other})
    with pytest.raises(StreamDenied) as caught:
        async with open_stream(f"{guest.stream_base}/v1/logs/", token):
            pass
    assert caught.value.status == 404
    assert os.path.exists(guest.log)
