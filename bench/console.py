"""console: guest serial output through the agent's stream server vs libvirt's console stream.

The test guest (tests/guest) under qemu:///system, TCG, booted through the agent. In each
round the guest's shell prints `seq 1 N` (about 270 KB) three times: to 1 and to 4 viewers
connected to the agent's own stream server with tokens from compute.instance.console (binary
subprotocol, the per-VM console hub behind it), and to a bare libvirt console stream opened in
this process (virDomainOpenConsole + virStream callbacks, no hub, no websocket) — the
baseline. Bytes/s is measured between a start and an end marker the shell prints around the
data, at the slowest viewer. The ratio is agent (1 viewer) ÷ baseline; the serial port of a
TCG guest is the ceiling for both.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from typing import Any
from urllib.parse import quote

import libvirt
from websockets.asyncio.client import connect
from websockets.typing import Subprotocol

from bench.common import Result, Summary, Target, fmt, print_table

SEQ_N = 40_000
EXPECTED = b"".join(b"%d\r\n" % i for i in range(1, SEQ_N + 1))
START, END = b"S2S\r\n", b"E4E\r\n"
COMMAND = f'echo "S$((1+1))S"; seq 1 {SEQ_N}; echo "E$((2+2))E"\r'.encode()


def _payload(buf: bytearray) -> bytes:
    start = buf.index(START) + len(START)
    return bytes(buf[start:buf.index(END, start)])


async def _through_agent(guest: Any, viewers: int) -> float:
    from tests.console_exec_guest import read_until

    url, token = await guest.grant("console")
    conns = [await connect(f"{url}?token={quote(token)}", subprotocols=[Subprotocol("binary")],
                           compression=None, max_size=None).__aenter__() for _ in range(viewers)]
    try:
        for ws in conns:  # drop the scrollback replay
            while True:
                try:
                    await asyncio.wait_for(ws.recv(), 0.5)
                except TimeoutError:
                    break
        await conns[0].send(COMMAND)
        bufs = [bytearray() for _ in conns]

        async def one(ws: Any, buf: bytearray) -> float:
            await read_until(ws, START, buf, timeout=60)
            t0 = time.monotonic()
            await read_until(ws, END, buf, timeout=300)
            return time.monotonic() - t0

        elapsed = max(await asyncio.gather(*(one(ws, b) for ws, b in zip(conns, bufs))))
        for buf in bufs:
            assert hashlib.sha256(_payload(buf)).digest() == hashlib.sha256(EXPECTED).digest()
    finally:
        for ws in conns:
            await ws.close()
    await asyncio.sleep(0.5)  # the hub closes its libvirt session after the last viewer
    return len(EXPECTED) / elapsed


async def _direct(dom: libvirt.virDomain) -> float:
    conn = dom.connect()
    stream = conn.newStream(libvirt.VIR_STREAM_NONBLOCK)
    dom.openConsole(None, stream, libvirt.VIR_DOMAIN_CONSOLE_FORCE)
    buf = bytearray()
    marks: dict[str, float] = {}
    loop = asyncio.get_running_loop()
    done = loop.create_future()

    def finish() -> None:
        if not done.done():
            done.set_result(None)

    def readable(st: libvirt.virStream, events: int, _opaque: object) -> None:  # libvirt's event thread
        while True:
            try:
                data = st.recv(65536)
            except libvirt.libvirtError:
                break
            if data == -2 or not data:
                break
            buf.extend(data)  # type: ignore[arg-type]
        if "start" not in marks and START in buf:
            marks["start"] = time.monotonic()
        if "start" in marks and "end" not in marks and buf.find(END, buf.index(START)) >= 0:
            marks["end"] = time.monotonic()
            loop.call_soon_threadsafe(finish)

    stream.eventAddCallback(libvirt.VIR_STREAM_EVENT_READABLE, readable, None)
    try:
        await asyncio.sleep(0.5)
        buf.clear()
        stream.send(COMMAND)
        await asyncio.wait_for(done, 300)
    finally:
        stream.eventRemoveCallback()
        stream.abort()
    assert hashlib.sha256(_payload(buf)).digest() == hashlib.sha256(EXPECTED).digest()
    return len(EXPECTED) / (marks["end"] - marks["start"])


async def run(quick: bool, shared: dict[str, Any]) -> Result:
    if os.geteuid() != 0:
        raise SystemExit("console: needs root for qemu:///system (run as root after scripts/libvirt-up)")
    from tests.console_exec_guest import booted_guest, read_until

    rounds = 2 if quick else 3
    found: dict[str, list[float]] = {"agent, 1 viewer": [], "agent, 4 viewers": [], "libvirt stream": []}
    async with booted_guest("bench-console") as guest:
        await guest.wait_log("HERDSMAN-GUEST: ready", 300)
        url, token = await guest.grant("console")
        async with connect(f"{url}?token={quote(token)}", subprotocols=[Subprotocol("binary")]) as ws:
            for attempt in range(60):  # the serial shell starts a moment after the ready marker
                await ws.send(f"echo P$(({attempt}+1000))P\r".encode())
                try:
                    await read_until(ws, b"P%dP\r\n" % (attempt + 1000), bytearray(), timeout=2)
                    break
                except AssertionError:
                    continue
        await asyncio.sleep(0.5)
        dom = await guest.driver.domain(guest.uuid)
        for _ in range(rounds):
            found["agent, 1 viewer"].append(await _through_agent(guest, 1))
            found["agent, 4 viewers"].append(await _through_agent(guest, 4))
            found["libvirt stream"].append(await _direct(dom))
    rows = []
    for label, rates in found.items():
        s = Summary.of(rates)
        rows.append([label, str(s.n), fmt(s.median / 1024), fmt(s.min / 1024), fmt(s.max / 1024)])
    print_table(f"console: {len(EXPECTED)} bytes of serial output per run, {rounds} rounds",
                ("", "n", "median KiB/s", "min KiB/s", "max KiB/s"), rows)
    one, four, base = (Summary.of(found[k]).median for k in found)
    return Result(
        name="console",
        ratio=one / base,
        figures={"1 viewer KiB/s": fmt(one / 1024), "4 viewers KiB/s": fmt(four / 1024),
                 "libvirt stream KiB/s": fmt(base / 1024)},
        targets=[Target("throughput to 1 viewer, agent/libvirt stream", one / base, 0.9, "×", at_least=True),
                 Target("throughput to 4 viewers, agent/libvirt stream", four / base, 0.9, "×", at_least=True)],
    )
