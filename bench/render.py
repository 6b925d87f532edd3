"""render: Cattle instance → validated spec → domain model → domain XML, per second.

The same VM shape as `activate` (two disks, userdata, labels, one NIC), rendered with the
profile and policy the agent would use on libvirt's test driver. Three stages are timed per
VM: spec validation (pydantic, `spec_from_cattle_instance`), the configurator pipeline
(`build_domain`) and serialisation (`writer.to_xml`). libvirt's own schema check at define
time is not part of render; it is inside the activate figure.

The ratio is render seconds per VM over activate seconds per VM (agent, 100 in flight), i.e.
render's share of an activation: taken from `activate` when it ran earlier in the same
`python -m bench` run, otherwise measured here with a shorter activate run.
"""

from __future__ import annotations

import time
from typing import Any

import libvirt

from agent.spec.cattle import spec_from_cattle_instance
from bench import activate, fixtures
from bench.common import SUMMARY_HEADER, Result, Summary, fmt, print_table, summary_row
from drivers.libvirt.domxml.builder import build_domain
from drivers.libvirt.domxml.inputs import RenderInput
from drivers.libvirt.domxml.writer import to_xml


def measure(count: int, rounds: int) -> dict[str, Any]:
    conn = libvirt.open(fixtures.TEST_URI)
    try:
        profile = fixtures.profile_of(conn)
    finally:
        conn.close()
    with fixtures.scratch("render") as root:
        policy = fixtures.policy_of(fixtures.agent_config("http://127.0.0.1:9/v1", root))
    insts = fixtures.instances(count, "render")
    stages: dict[str, list[float]] = {"validate": [], "build": [], "serialise": [], "total": []}
    round_rates = []
    sizes = []
    for inst in insts[:50]:  # warm-up: imports, pydantic and lxml caches
        fixtures.render(inst, profile, policy)
    for _ in range(rounds):
        started = time.perf_counter()
        for inst in insts:
            t0 = time.perf_counter()
            spec = spec_from_cattle_instance(inst)
            t1 = time.perf_counter()
            domain = build_domain(RenderInput(spec=spec, profile=profile, policy=policy,
                                              macs=(inst["nics"][0]["macAddress"],)))
            t2 = time.perf_counter()
            xml = to_xml(domain)
            t3 = time.perf_counter()
            stages["validate"].append(t1 - t0)
            stages["build"].append(t2 - t1)
            stages["serialise"].append(t3 - t2)
            stages["total"].append(t3 - t0)
            sizes.append(len(xml))
        round_rates.append(count / (time.perf_counter() - started))
    return {"stages": stages, "round_rates": round_rates, "xml_bytes": sizes}


async def run(quick: bool, shared: dict[str, Any]) -> Result:
    count, rounds = (200, 3) if quick else (1000, 5)
    found = measure(count, rounds)
    stages, rates = found["stages"], found["round_rates"]
    rows = [summary_row(name, values) for name, values in stages.items()]
    print_table(f"render: {count} VMs × {rounds} rounds, per VM", SUMMARY_HEADER, rows)
    rate = Summary.of(rates)
    print(f"\n  VMs/s over {rounds} rounds: median {fmt(rate.median)}, p95 {fmt(rate.p95)}, "
          f"min {fmt(rate.min)}, max {fmt(rate.max)}; XML {fmt(Summary.of(found['xml_bytes']).median)} bytes")
    notes = []
    activate_per_vm = shared.get("activate_seconds_per_vm")
    if activate_per_vm is None:
        short = 100 if quick else 300
        top = (await activate.measure(short, (100,)))[0]
        activate_per_vm = top["wall"] / top["count"]
        notes.append(f"activate measured here ({short} VMs, 100 in flight): {fmt(activate_per_vm * 1000)} ms per VM")
    render_per_vm = Summary.of(stages["total"]).median
    print(f"  render per VM {fmt(render_per_vm * 1000)} ms = {100 * render_per_vm / activate_per_vm:.1f} % "
          f"of the agent's {fmt(activate_per_vm * 1000)} ms per activation")
    return Result(
        name="render",
        ratio=render_per_vm / activate_per_vm,
        figures={
            "VMs/s": fmt(rate.median),
            **{f"{name} ms": fmt(Summary.of(values).median * 1000) for name, values in stages.items()},
            "share of activate": f"{100 * render_per_vm / activate_per_vm:.1f}%",
        },
        notes=notes,
    )
