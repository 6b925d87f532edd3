"""scale: an agent managing 1,000 VMs — ping, adoption, and its idle cost.

In this process (libvirt's test:///default, shared by every connection of the process):
1,000 agent-rendered domains are defined and started directly, then an agent starts and
adopts them. Then, interleaved: a ping with options.instances through the controller
process (send → reply, and the reply's size) against the bare libvirt calls such a ping
needs (`listAllDomains` + `getAllDomainStats`, the baseline of the ratio). Then a fresh
`LibvirtDriver.start()` adopts the same domains again, with a lifecycle callback and a
before/after snapshot (id, state, XML) proving it touched none.

In a real process: `herdsman run` on a test-driver node file with 1,000 agent-rendered
domains (see procwatch) adopts them at start-up (its "adopted managed domains" log line),
then idles with a ping every 5 s while psutil samples its RSS and CPU.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from typing import Any

import libvirt

from bench import fixtures, procwatch
from bench.common import (
    SUMMARY_HEADER,
    Result,
    Summary,
    Target,
    fmt,
    ms,
    print_table,
    summary_row,
)
from bench.controller import RemoteController
from drivers.libvirt.driver import LibvirtDriver

ADOPTED = "adopted managed domains"
PING_EVERY = 5.0
#: The first seconds after the subscription are start-up, not idle: the start-up host check and the
#: adoption's follow-ups (restart policy, health, ports) still read every VM, and the agent trims
#: its heap 5 s after adopting (agent/heap.py). Their peak is reported apart.
START_UP = 10.0


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def snapshot(conn: libvirt.virConnect) -> dict[str, tuple[int, int, int, str]]:
    """uuid → (id, state, reason, digest of the live XML) for every domain."""
    found = {}
    for dom in conn.listAllDomains(0):
        state, reason = dom.state()
        found[dom.UUIDString()] = (dom.ID(), state, reason, hashlib.sha256(dom.XMLDesc(0).encode()).hexdigest())
    return found


def bare_list(conn: libvirt.virConnect) -> float:
    t0 = time.perf_counter()
    conn.listAllDomains(0)
    conn.getAllDomainStats(libvirt.VIR_DOMAIN_STATS_STATE, 0)
    return time.perf_counter() - t0


def bare_adopt(conn: libvirt.virConnect) -> float:
    """What adoption cannot avoid: list the domains and read each one's metadata."""
    from drivers.libvirt.domxml import metadata

    t0 = time.perf_counter()
    for dom in conn.listAllDomains(0):
        try:
            dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, metadata.NAMESPACE, 0)
        except libvirt.libvirtError:
            pass
    return time.perf_counter() - t0


async def fresh_adoption(conn: libvirt.virConnect, policy: Any) -> dict[str, Any]:
    """A new LibvirtDriver in this process adopts every domain; nothing may change."""
    events: list[tuple[str, int]] = []
    callback = conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE,
                                           lambda _c, dom, event, _d, _o: events.append((dom.UUIDString(), event)), None)
    records = _Records()
    logger = logging.getLogger("bench.scale.adopt")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    logger.addHandler(records)
    before = snapshot(conn)
    driver = LibvirtDriver(fixtures.TEST_URI, policy=policy, domain_type="qemu", logger=logger)
    try:
        t0 = time.perf_counter()
        await driver.start()
        started = time.perf_counter() - t0
        listed = len(await driver.list_vms())
        await asyncio.sleep(0.3)  # let libvirt dispatch any event the adoption caused
    finally:
        await driver.close()
        conn.domainEventDeregisterAny(callback)
        logger.removeHandler(records)
    after = snapshot(conn)
    logged = [r for r in records.records if r.getMessage() == ADOPTED]
    return {"start": started, "logged": getattr(logged[0], "seconds", float("nan")) if logged else float("nan"),
            "listed": listed, "events": len(events), "changed": sum(1 for k, v in before.items() if after.get(k) != v)}


async def in_process(ctl: RemoteController, count: int, pings: int, rounds: int) -> dict[str, Any]:
    conn = libvirt.open(fixtures.TEST_URI)
    insts = fixtures.instances(count, "scale")
    uuids = [i["uuid"] for i in insts]
    out: dict[str, Any] = {"ping": [], "ping_bytes": [], "ping_instances": [], "light": [], "bare": [],
                           "adopt": [], "bare_adopt": []}
    try:
        with fixtures.scratch("scale") as root:
            config = fixtures.agent_config(ctl.url, root)
            profile, policy = fixtures.profile_of(conn), fixtures.policy_of(config)
            for xml in (fixtures.render(i, profile, policy) for i in insts):
                conn.defineXML(xml).create()
            async with fixtures.in_process_agent(config, root / "agent.log"):
                await ctl.wait_subscribed()
                out["startup_adoption"] = procwatch.log_records(root / "agent.log", ADOPTED)
                await ctl.requests([fixtures.ping_request()])  # warm-up
                for _ in range(pings):
                    result = (await ctl.requests([fixtures.ping_request()], timeout=60))["results"][0]
                    out["ping"].append(result["seconds"])
                    out["ping_bytes"].append(result["bytes"])
                    out["ping_instances"].append(result.get("instances", 0))
                    out["bare"].append(bare_list(conn))
                light = await ctl.requests([fixtures.ping_request(False)] * 5)
                out["light"] = [r["seconds"] for r in light["results"]]
                for _ in range(rounds):
                    out["adopt"].append(await fresh_adoption(conn, policy))
                    out["bare_adopt"].append(bare_adopt(conn))
    finally:
        fixtures.purge(conn, uuids)
        conn.close()
    return out


async def in_a_process(ctl: RemoteController, count: int, idle: float) -> dict[str, Any]:
    conn = libvirt.open(fixtures.TEST_URI)
    try:
        profile = fixtures.profile_of(conn)
    finally:
        conn.close()
    with fixtures.scratch("scale-process") as root:
        policy = fixtures.policy_of(fixtures.agent_config(ctl.url, root))
        uri = procwatch.write_node_file(root / "node.xml", [fixtures.render(i, profile, policy)
                                                             for i in fixtures.instances(count, "proc")])
        agent = procwatch.AgentProcess(ctl.url, uri, root)
        bare, empty = procwatch.BareProcess(uri), procwatch.BareProcess(fixtures.TEST_URI)
        pid = await agent.start()
        try:
            await ctl.wait_subscribed(timeout=120)
            startup = time.perf_counter() - agent.started
            bare_pid, bare_seen = await bare.start()
            empty_pid, _ = await empty.start()
            pinging = asyncio.create_task(ctl.requests([fixtures.ping_request()] * max(1, int(idle // PING_EVERY)),
                                                       interval=PING_EVERY, timeout=60))
            usage = await procwatch.sample({"agent": pid, "bare": bare_pid, "empty": empty_pid}, idle)
            pings = (await pinging)["results"]
        finally:
            code = await agent.stop()
            await bare.stop()
            await empty.stop()
        adopted = agent.log_records(ADOPTED)
    return {"startup": startup, "adopted": adopted, "usage": usage, "exit": code, "bare_seen": bare_seen,
            "ping": [p["seconds"] for p in pings if p["seconds"] is not None],
            "ping_instances": [p.get("instances", 0) for p in pings]}


def _mib(values: list[int]) -> str:
    return fmt(Summary.of(values).max / (1 << 20))


async def run(quick: bool, shared: dict[str, Any]) -> Result:
    count, pings, rounds, idle = (200, 10, 3, 15.0) if quick else (1000, 20, 5, 60.0)
    async with RemoteController() as ctl:
        inner = await in_process(ctl, count, pings, rounds)
        proc = await in_a_process(ctl, count, idle)
    adopt_start = [a["start"] for a in inner["adopt"]]
    adopt_logged = [a["logged"] for a in inner["adopt"]]
    startup = inner["startup_adoption"][0] if inner["startup_adoption"] else {}
    rows = [
        summary_row("ping + instances (in-process agent)", inner["ping"]),
        summary_row("ping, no instances", inner["light"]),
        summary_row("listAllDomains + getAllDomainStats", inner["bare"]),
        summary_row("fresh LibvirtDriver.start()", adopt_start),
        summary_row("  of which adoption (its log)", adopt_logged),
        summary_row("listAllDomains + metadata() each", inner["bare_adopt"]),
        summary_row("ping + instances (agent process)", proc["ping"]),
    ]
    print_table(f"scale: {count} managed VMs on libvirt's test driver", SUMMARY_HEADER, rows)
    touched = sum(a["changed"] for a in inner["adopt"])
    events = sum(a["events"] for a in inner["adopt"])
    listed = {a["listed"] for a in inner["adopt"]}
    print(f"\n  ping reply: {fmt(Summary.of(inner['ping_bytes']).median / 1024)} KiB, "
          f"{Summary.of(inner['ping_instances']).median:.0f} instances; agent start-up adoption "
          f"{startup.get('count')} in {startup.get('seconds')} s; fresh adoptions listed {sorted(listed)}, "
          f"domains changed {touched}, lifecycle events {events}")
    usage = proc["usage"]
    agent_rss, bare_rss, empty_rss = usage["agent"].rss, usage["bare"].rss, usage["empty"].rss
    settled = int(START_UP)  # procwatch samples once a second
    start_rss, idle_rss = agent_rss[:settled], agent_rss[settled:]
    driver_share = (max(bare_rss) - max(empty_rss)) / (1 << 20)
    own_rss = max(idle_rss) / (1 << 20) - driver_share
    adopted = proc["adopted"][0] if proc["adopted"] else {}
    print_table(f"agent process: {count} domains adopted at start, then {idle:.0f} s idle with a ping every {PING_EVERY:.0f} s", 
                ("", f"RSS max MiB, first {START_UP:.0f} s", "RSS max MiB, idle", "RSS last MiB", "CPU % of a core"),
                [["herdsman run", _mib(start_rss), _mib(idle_rss), fmt(agent_rss[-1] / (1 << 20)),
                  fmt(usage["agent"].cpu_percent)],
                 ["python + libvirt, same file", "", _mib(bare_rss), fmt(bare_rss[-1] / (1 << 20)), fmt(usage["bare"].cpu_percent)],
                 ["python + libvirt, test:///default", "", _mib(empty_rss), fmt(empty_rss[-1] / (1 << 20)),
                  fmt(usage["empty"].cpu_percent)]])
    print(f"\n  the test driver's {count} domains take {fmt(driver_share)} MiB of any process that opens the file; "
          f"the agent without them (as with libvirtd): about {fmt(own_rss)} MiB")
    print(f"\n  start to subscribed {fmt(proc['startup'])} s; adopted {adopted.get('count')} in {adopted.get('seconds')} s "
          f"(bare process sees {proc['bare_seen']}); pings answered {len(proc['ping'])} with "
          f"{sorted(set(proc['ping_instances']))} instances; exit code after SIGTERM {proc['exit']}")
    ping = Summary.of(inner["ping"])
    process_adoption = float(adopted.get("seconds", float("nan")))
    notes = []
    if touched or events:
        notes.append(f"adoption changed {touched} domains and caused {events} lifecycle events")
    if listed != {count}:
        notes.append(f"fresh adoption listed {sorted(listed)} VMs, expected {count}")
    return Result(
        name="scale",
        ratio=ping.median / Summary.of(inner["bare"]).median,
        figures={
            "VMs": str(count),
            "ping ms": f"p50 {ms(ping.median)} p95 {ms(ping.p95)}",
            "ping KiB": fmt(Summary.of(inner["ping_bytes"]).median / 1024),
            "bare list ms": ms(Summary.of(inner["bare"]).median),
            "adopt in-process s": f"{fmt(Summary.of(adopt_logged).median)} (start {fmt(Summary.of(adopt_start).median)})",
            "adopt process s": fmt(process_adoption),
            "touched": f"{touched} changed, {events} events",
            "RSS MiB": f"{_mib(idle_rss)} idle, {_mib(start_rss)} in the first {START_UP:.0f} s "
                       f"(test driver {fmt(driver_share)}, agent's own ≈ {fmt(own_rss)})",
            "idle CPU %": fmt(usage["agent"].cpu_percent),
        },
        targets=[
            Target("ping p95 (in-process, options.instances)", ping.p95 * 1000, 50, " ms"),
            Target("adoption, fresh driver (median start)", Summary.of(adopt_start).median, 2, " s"),
            Target("adoption in a process (log)", process_adoption, 2, " s"),
            Target("RSS max while idle", Summary.of(idle_rss).max / (1 << 20), 120, " MiB"),
            Target("RSS without the test driver's domains", own_rss, 120, " MiB"),
            Target("idle CPU", usage["agent"].cpu_percent, 2, " %"),
        ],
        notes=notes,
    )
