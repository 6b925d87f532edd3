"""activate: compute.instance.activate events through the whole agent, against bare libvirt.

For each of 1, 10 and 100 events in flight, a fresh agent (in this process, libvirt's
test:///default, a fresh state dir, JSON logs to a file) receives N activate events for
distinct VMs from the controller double, which runs in its own process and times each event
from the websocket send to the reply's arrival on /publish. Just before each agent run, the
same domain XML documents (rendered by the agent's own render_xml for the same specs, profile
and policy) are defined and started by direct libvirt-python calls in a loop: that is the
baseline, the least any agent must do. The ratio is agent seconds per activation at 100 in
flight over baseline seconds per activation.

The agent defines with VIR_DOMAIN_DEFINE_VALIDATE (libvirt checks the XML against its
schema); the baseline does not, since it is not needed to run a VM. A shorter loop with the
flag is timed as well, so that cost can be told apart from the agent's own.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import libvirt

from bench import fixtures
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

LEVELS = (1, 10, 100)
WARMUP = 10


def baseline(conn: libvirt.virConnect, xmls: list[str], flags: int = 0) -> tuple[float, list[float]]:
    """Define and start each domain; wall time and per-VM times."""
    per_vm = []
    started = time.perf_counter()
    for xml in xmls:
        t0 = time.perf_counter()
        dom = conn.defineXMLFlags(xml, flags)
        dom.create()
        per_vm.append(time.perf_counter() - t0)
    return time.perf_counter() - started, per_vm


async def agent_run(ctl: RemoteController, root: Path, insts: list[dict[str, Any]], inflight: int,
                    warmup: list[dict[str, Any]]) -> dict[str, Any]:
    config = fixtures.agent_config(ctl.url, root)
    async with fixtures.in_process_agent(config, root / "agent.log"):
        await ctl.wait_subscribed()
        await ctl.requests([fixtures.activate_request(i) for i in warmup], inflight=min(inflight, len(warmup)))
        return await ctl.requests([fixtures.activate_request(i) for i in insts], inflight=inflight, timeout=300)


async def level(ctl: RemoteController, conn: libvirt.virConnect, inflight: int, count: int) -> dict[str, Any]:
    with fixtures.scratch(f"activate-{inflight}") as root:
        config = fixtures.agent_config(ctl.url, root)
        insts = fixtures.instances(count, f"c{inflight}")
        warmup = fixtures.instances(WARMUP, f"w{inflight}")
        profile, policy = fixtures.profile_of(conn), fixtures.policy_of(config)
        xmls = [fixtures.render(i, profile, policy) for i in insts]
        uuids = [i["uuid"] for i in insts]
        base_wall, base_per_vm = baseline(conn, xmls)
        fixtures.purge(conn, uuids)
        checked = xmls[: max(20, count // 5)]
        _, validated_per_vm = baseline(conn, checked, libvirt.VIR_DOMAIN_DEFINE_VALIDATE)
        fixtures.purge(conn, uuids[: len(checked)])
        cpu = time.process_time()
        answer = await agent_run(ctl, root, insts, inflight, warmup)
        cpu = time.process_time() - cpu
        running = sum(1 for d in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE) if d.UUIDString() in set(uuids))
        fixtures.purge(conn, uuids + [i["uuid"] for i in warmup])
    results = answer["results"]
    errors = [r["error"] for r in results if r["error"]]
    return {
        "inflight": inflight,
        "count": count,
        "wall": answer["wall"],
        "cpu_per_vm": cpu / (count + WARMUP),
        "latencies": [r["seconds"] for r in results if r["seconds"] is not None and not r["error"]],
        "errors": errors,
        "running": running,
        "base_wall": base_wall,
        "base_per_vm": base_per_vm,
        "validated_per_vm": validated_per_vm,
    }


async def measure(count: int, levels: tuple[int, ...] = LEVELS) -> list[dict[str, Any]]:
    conn = libvirt.open(fixtures.TEST_URI)  # held open: the test driver's state lives while a connection does
    try:
        async with RemoteController() as ctl:
            return [await level(ctl, conn, inflight, count) for inflight in levels]
    finally:
        conn.close()


async def run(quick: bool, shared: dict[str, Any]) -> Result:
    count = 200 if quick else 1000
    runs = await measure(count)
    rows = []
    for r in runs:
        rate = r["count"] / r["wall"]
        rows.append([f"agent, {r['inflight']} in flight", f"{rate:.0f}", *summary_row("", r["latencies"])[1:],
                     ms(r["cpu_per_vm"]), str(len(r["errors"])), f"{r['running']}/{r['count']}"])
    for r in runs:
        rate = r["count"] / r["base_wall"]
        rows.append([f"libvirt loop (before {r['inflight']})", f"{rate:.0f}", *summary_row("", r["base_per_vm"])[1:], "-", "0", "-"])
    for r in runs:
        per_vm = r["validated_per_vm"]
        rows.append([f"  + VALIDATE flag (before {r['inflight']})", f"{len(per_vm) / sum(per_vm):.0f}",
                     *summary_row("", per_vm)[1:], "-", "0", "-"])
    print_table(f"activate: {count} VMs (2 disks, userdata, labels) per run; latency = send → reply",
                ("", "events/s", *SUMMARY_HEADER[1:], "CPU ms/VM", "errors", "running"), rows)
    top = runs[-1]
    agent_per_vm = top["wall"] / top["count"]
    base_per_vm = top["base_wall"] / top["count"]
    base_rates = [r["count"] / r["base_wall"] for r in runs]
    print(f"\n  baseline over its {len(runs)} runs: median {fmt(Summary.of(base_rates).median)} /s, "
          f"min {fmt(min(base_rates))}, max {fmt(max(base_rates))}")
    shared["activate_seconds_per_vm"] = agent_per_vm
    lat = Summary.of(top["latencies"])
    figures = {}
    for r in runs:
        s = Summary.of(r["latencies"])
        figures[f"c{r['inflight']}"] = (f"{r['count'] / r['wall']:.0f}/s p50 {ms(s.median)} p95 {ms(s.p95)} "
                                       f"p99 {ms(s.p99)} ms, CPU {ms(r['cpu_per_vm'])} ms/VM")
    figures["libvirt loop"] = f"{top['count'] / top['base_wall']:.0f}/s"
    figures["with VALIDATE"] = f"{len(top['validated_per_vm']) / sum(top['validated_per_vm']):.0f}/s"
    figures["errors"] = str(sum(len(r["errors"]) for r in runs))
    notes = [f"{r['inflight']} in flight: {len(r['errors'])} errors, first: {r['errors'][0]}" for r in runs if r["errors"]]
    return Result(
        name="activate",
        ratio=agent_per_vm / base_per_vm,
        figures=figures,
        targets=[Target("activations/s at 100 in flight", top["count"] / top["wall"], 300, "/s", at_least=True),
                 Target("p99 latency at 100 in flight", lat.p99 * 1000, 50, " ms")],
        notes=notes,
    )
