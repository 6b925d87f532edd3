"""metrics: one Prometheus scrape of an agent managing 1,000 VMs.

In this process (libvirt's test:///default): 1,000 agent-rendered domains are defined and
started, then an in-process agent with `--metrics-listen 127.0.0.1:0` adopts them. `curl`, a
process of its own (as Prometheus would be), scrapes `/metrics` repeatedly; each scrape is
timed by curl from connect to last byte. Interleaved with the scrapes, the **baseline**: the
one libvirt call a scrape cannot avoid, `getAllDomainStats` with the same stats groups, made
directly in this process. While scraping, a ticker on the agent's event loop records how late
it ran (the loop must keep serving events during a scrape).

libvirt's test driver reports state only, so those scrapes carry ~8 series per VM. The
**full** rows serve what a real host reports (CPU, vCPU, memory, 3 disks, 1 NIC: 34 series
per VM, from a recorded qemu:///system record given 1,000 uuids) through the same scraper and
HTTP server, to show the cost of the text itself; `parse` times turning 1,000 such records
into samples (the driver's side of a real scrape).

**Ratio**: median scrape (test driver) ÷ median bare `getAllDomainStats`.
**Target**: scrape ≤ 100 ms at 1,000 VMs (p95), on the test driver and with full stats.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import libvirt

from agent.metrics import MetricsServer, Scraper
from bench import fixtures
from bench.common import SUMMARY_HEADER, Result, Summary, Target, fmt, ms, print_table, summary_row
from bench.controller import RemoteController
from drivers.base import VmSample
from drivers.libvirt.stats import STATS_GROUPS, samples_from_stats

# A running test guest's record on qemu:///system, with two more disks (root and data) like
# the benchmark's VM shape.
RECORD: dict[str, Any] = {
    "state.state": 1, "state.reason": 1, "cpu.time": 357943000, "cpu.user": 135579000, "cpu.system": 222363000,
    "balloon.current": 65536, "balloon.maximum": 65536, "balloon.rss": 63556,
    "vcpu.current": 1, "vcpu.maximum": 1, "vcpu.0.state": 1, "vcpu.0.time": 60000000,
    "net.count": 1, "net.0.name": "vnet52", "net.0.rx.bytes": 90412, "net.0.rx.pkts": 133, "net.0.rx.errs": 0,
    "net.0.rx.drop": 0, "net.0.tx.bytes": 4211, "net.0.tx.pkts": 31, "net.0.tx.errs": 0, "net.0.tx.drop": 0,
    "block.count": 3,
    **{f"block.{i}.{key}": val for i, name in enumerate(("vda", "vdb", "hdc"))
       for key, val in (("name", name), ("rd.reqs", 1213), ("rd.bytes", 40123904), ("wr.reqs", 310),
                        ("wr.bytes", 2084864))},
}


async def curl(url: str) -> tuple[float, int]:
    """Seconds from connect to last byte, and the body's size, as curl measured them."""
    proc = await asyncio.create_subprocess_exec(
        "curl", "-sS", "--fail", "-o", "/dev/null", "-w", "%{time_total} %{size_download}", url,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"curl {url}: {err.decode().strip()}")
    seconds, size = out.decode().split()
    return float(seconds), int(size)


def bare_stats(conn: libvirt.virConnect) -> float:
    t0 = time.perf_counter()
    conn.getAllDomainStats(STATS_GROUPS, 0)
    return time.perf_counter() - t0


async def scrapes(url: str, count: int, between: Any = None) -> dict[str, list[float]]:
    """`count` scrapes (after one warm-up), with a ticker measuring this loop's lateness."""
    lateness: list[float] = []

    async def tick() -> None:
        while True:
            t0 = time.perf_counter()
            await asyncio.sleep(0.005)
            lateness.append(time.perf_counter() - t0 - 0.005)

    await curl(url)
    out: dict[str, list[float]] = {"scrape": [], "bytes": [], "bare": []}
    ticker = asyncio.create_task(tick())
    try:
        for _ in range(count):
            seconds, size = await curl(url)
            out["scrape"].append(seconds)
            out["bytes"].append(size)
            if between is not None:
                out["bare"].append(between())
    finally:
        ticker.cancel()
    out["lateness"] = lateness
    return out


async def agent_scrapes(ctl: RemoteController, count: int, n: int) -> dict[str, list[float]]:
    conn = libvirt.open(fixtures.TEST_URI)
    insts = fixtures.instances(count, "metrics")
    try:
        with fixtures.scratch("metrics") as root:
            config = fixtures.agent_config(ctl.url, root).model_copy(update={"metrics_listen": "127.0.0.1:0"})
            profile, policy = fixtures.profile_of(conn), fixtures.policy_of(config)
            for xml in (fixtures.render(i, profile, policy) for i in insts):
                conn.defineXML(xml).create()
            async with fixtures.in_process_agent(config, root / "agent.log") as agent:
                await ctl.wait_subscribed()
                assert agent.metrics is not None
                return await scrapes(f"http://127.0.0.1:{agent.metrics.port}/metrics", n, lambda: bare_stats(conn))
    finally:
        fixtures.purge(conn, [i["uuid"] for i in insts])
        conn.close()


async def full_scrapes(count: int, n: int) -> dict[str, list[float]]:
    records = [(str(uuid.uuid4()), RECORD) for _ in range(count)]
    names = {u: f"bench-metrics-{i}" for i, (u, _) in enumerate(records)}
    parse = []
    for _ in range(5):
        t0 = time.perf_counter()
        samples = samples_from_stats(records, names)
        parse.append(time.perf_counter() - t0)

    async def recorded() -> list[VmSample]:
        return samples

    server = MetricsServer("127.0.0.1:0", Scraper(recorded).scrape)
    await server.start()
    try:
        out = await scrapes(f"http://127.0.0.1:{server.port}/metrics", n)
    finally:
        await server.close()
    out["parse"] = parse
    return out


async def run(quick: bool, shared: dict[str, Any]) -> Result:
    count, n = (200, 10) if quick else (1000, 30)
    async with RemoteController() as ctl:
        agent = await agent_scrapes(ctl, count, n)
    full = await full_scrapes(count, n)
    rows = [
        summary_row("scrape, test driver (curl)", agent["scrape"]),
        summary_row("getAllDomainStats, bare", agent["bare"]),
        summary_row("scrape, full stats (curl)", full["scrape"]),
        summary_row("  parse 1,000 records", full["parse"]),
        summary_row("loop lateness, test driver", agent["lateness"]),
        summary_row("loop lateness, full stats", full["lateness"]),
    ]
    print_table(f"metrics: {count} VMs, {n} scrapes each", SUMMARY_HEADER, rows)
    size, full_size = Summary.of(agent["bytes"]).median, Summary.of(full["bytes"]).median
    print(f"\n  body: {fmt(size / 1024)} KiB (test driver), {fmt(full_size / 1024)} KiB (full stats)")
    scrape, bare, full_s = Summary.of(agent["scrape"]), Summary.of(agent["bare"]), Summary.of(full["scrape"])
    return Result(
        name="metrics",
        ratio=scrape.median / bare.median,
        figures={
            "VMs": str(count),
            "scrape ms": f"p50 {ms(scrape.median)} p95 {ms(scrape.p95)}",
            "bare stats ms": ms(bare.median),
            "full scrape ms": f"p50 {ms(full_s.median)} p95 {ms(full_s.p95)}",
            "parse ms": ms(Summary.of(full["parse"]).median),
            "KiB": f"{fmt(size / 1024)} / {fmt(full_size / 1024)} full",
            "loop late max ms": f"{ms(Summary.of(agent['lateness']).max)} / {ms(Summary.of(full['lateness']).max)} full",
        },
        targets=[
            Target("scrape p95 (test driver)", scrape.p95 * 1000, 100, " ms"),
            Target("scrape p95 (full stats)", full_s.p95 * 1000, 100, " ms"),
        ],
    )
