"""boot: activate → domain running → user-data marker, through the agent vs `virsh create`.

Real libvirtd (qemu:///system, root) and real qemu under TCG, booting the test guest
(tests/guest). Each round boots one VM through the agent (controller event → validate →
render → volumes + seed → define → start) and then the very same domain XML, volumes and seed
with `virsh create` — the agent removes the VM first (volumes and seed stay), so both boots use
the same image, seed and disk. Times: to the domain running (the activate reply; `virsh create`
returning) and to the user-data marker appearing in the serial log. One untimed warm-up boot
fills the image cache. The ratio is the agent's median time to the marker over the baseline's.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import time
import uuid as uuid_module
from pathlib import Path
from typing import Any

import libvirt

from bench.common import SUMMARY_HEADER, Result, Summary, Target, fmt, print_table, summary_row
from bench.fixtures import agent_config, in_process_agent
from tests.controller_double import ControllerDouble

URI = "qemu:///system"
ROOT = Path("/var/lib/herdsman-bench")
MARKER = "BOOT-BENCH-MARKER"
USERDATA = f"#!/bin/sh\necho {MARKER}\n"


def _guest_image(folder: Path) -> str:
    from tests.guest.build import ensure_guest, write_image_manifest

    manifest = folder / "image.json"
    write_image_manifest(ensure_guest(), manifest)
    return f"kernel:file://{manifest}"


def _instance(image: str) -> dict[str, Any]:
    return {"uuid": str(uuid_module.uuid4()), "name": "boot-bench", "kind": "virtualMachine", "memoryMb": 160,
            # no disk: the guest formats a blank disk on its first boot only, which would charge
            # mke2fs to whichever boot came first
            "userdata": USERDATA, "data": {"fields": {"vcpu": 1, "imageUuid": image, "hostname": "bench"}}}


async def _request(ctl: ControllerDouble, name: str, inst: dict[str, Any], **process: Any) -> dict[str, Any]:
    """The controller double in-process: a boot takes seconds, the double's share is noise."""
    data: dict[str, Any] = {"instanceHostMap": {"instance": inst}}
    if process:
        data["processData"] = process
    return await ctl.request(f"compute.instance.{name}", data, resource_type="instanceHostMap",
                             resource_id=f"bench-{inst['uuid'][:8]}", timeout=300)


def _random_mac() -> str:
    return "52:54:00:" + ":".join(f"{b:02x}" for b in os.urandom(3))


async def _marker(log: Path, offset: int, started: float, timeout: float = 300) -> float:
    deadline = started + timeout
    while time.perf_counter() < deadline:
        if log.exists() and MARKER.encode() in log.read_bytes()[offset:]:
            return time.perf_counter() - started
        await asyncio.sleep(0.05)
    raise TimeoutError(f"{MARKER} not in {log} after {timeout}s")


async def measure(rounds: int) -> dict[str, list[float]]:
    token = uuid_module.uuid4().hex[:8]
    root = ROOT / token
    root.mkdir(parents=True, mode=0o755)
    os.chmod(ROOT, 0o755)
    found: dict[str, list[float]] = {k: [] for k in ("agent running", "agent marker", "virsh running", "virsh marker")}
    conn = libvirt.open(URI)
    try:
        image = _guest_image(root / "images")
        ctl = ControllerDouble()
        await ctl.start()
        try:
            config = agent_config(ctl.url, root, uri=URI).model_copy(update={"storage_pool": f"hmbench-{token}"})
            async with in_process_agent(config, root / "agent.log"):
                await ctl.wait_subscribed()
                for round_ in range(rounds + 1):
                    inst = _instance(image)
                    log = root / "log" / "console" / f"{inst['uuid']}.log"
                    started = time.perf_counter()
                    reply = await _request(ctl, "activate", inst)
                    running = time.perf_counter() - started
                    if reply.get("transitioning") == "error":
                        raise RuntimeError(reply.get("transitioningMessage"))
                    marker = await _marker(log, 0, started)
                    xml = conn.lookupByUUIDString(inst["uuid"]).XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
                    await _request(ctl, "remove", inst, timeout=0)
                    xml_file = root / f"{inst['uuid']}.xml"
                    # A fresh MAC, like the agent's fresh VM: dnsmasq answers a MAC it already
                    # leased at once but probes a new address (~3 s) before offering it.
                    xml_file.write_text(re.sub(r"<mac address='[0-9a-f:]+'/>", f"<mac address='{_random_mac()}'/>", xml))
                    offset = log.stat().st_size
                    started = time.perf_counter()
                    subprocess.run(["virsh", "-c", URI, "create", str(xml_file)], check=True, capture_output=True)
                    virsh_running = time.perf_counter() - started
                    virsh_marker = await _marker(log, offset, started)
                    subprocess.run(["virsh", "-c", URI, "destroy", inst["uuid"]], check=True, capture_output=True)
                    await _request(ctl, "purge", inst)
                    if round_ == 0:
                        continue  # warm-up: image cache, page cache
                    for key, value in (("agent running", running), ("agent marker", marker),
                                       ("virsh running", virsh_running), ("virsh marker", virsh_marker)):
                        found[key].append(value)
        finally:
            await ctl.stop()
    finally:
        try:
            pool = conn.storagePoolLookupByName(f"hmbench-{token}")
            for vol in pool.listAllVolumes(0):
                vol.delete(0)
            pool.destroy()
            pool.undefine()
        except libvirt.libvirtError:
            pass
        conn.close()
        shutil.rmtree(root, ignore_errors=True)
    return found


async def run(quick: bool, shared: dict[str, Any]) -> Result:
    if os.geteuid() != 0:
        raise SystemExit("boot: needs root for qemu:///system (run as root after scripts/libvirt-up)")
    rounds = 2 if quick else 5
    found = await measure(rounds)
    print_table(f"boot: test guest under TCG, {rounds} rounds (+1 warm-up)", SUMMARY_HEADER,
                [summary_row(k, v) for k, v in found.items()])
    agent, virsh = Summary.of(found["agent marker"]), Summary.of(found["virsh marker"])
    ratio = agent.median / virsh.median
    return Result(
        name="boot",
        ratio=ratio,
        figures={k + " s": fmt(Summary.of(v).median) for k, v in found.items()},
        targets=[Target("time to user-data marker, agent/virsh create", ratio, 1.10, "×")],
        notes=["the agent's time includes validation, volumes, seed and define; virsh create reuses them"],
    )
