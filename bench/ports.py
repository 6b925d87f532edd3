"""ports: rebuilding the published-ports table for 1,000 VMs, and allocating one VM's ports.

Needs root and `nft` (it changes the host's real ruleset, in a table of its own named
`hmbench_<token>`, removed at the end). The VMs get addresses in 100.127.0.0/16 and no bridge,
so no route_localnet is touched; the FORWARD rule is added once (with the table's own comment)
and removed with the table.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import subprocess
import time
import uuid
from typing import Any

from bench.common import SUMMARY_HEADER, Result, Summary, fmt, print_table, summary_row
from drivers.ports import host, nft
from drivers.ports.model import PortBinding, PortRange, PortRequest, PublishedVm
from drivers.ports.publisher import PortPublisher
from drivers.ports.ruleset import TableConfig


def vms(count: int) -> list[PublishedVm]:
    base = int(ipaddress.IPv4Address("100.127.0.10"))
    return [PublishedVm(str(uuid.UUID(int=i + 1)),
                        (PortBinding("tcp", "0.0.0.0", 20000 + i, 80), PortBinding("udp", "127.0.0.1", 40000 + i, 53)),
                        str(ipaddress.IPv4Address(base + i)), None)
            for i in range(count)]


def measure(count: int, rounds: int) -> dict[str, list[float]]:
    table = TableConfig(name=f"hmbench_{uuid.uuid4().hex[:8]}")
    publisher = PortPublisher(table=table, port_range=PortRange(20000, 29999))
    fleet = vms(count)
    text = publisher.render(fleet).text
    times: dict[str, list[float]] = {"render": [], "bare nft -f": [], "sync (agent)": [], "allocate 1 VM": []}
    try:
        publisher.sync(fleet)  # warm-up, and the FORWARD rule goes in once
        for _ in range(rounds):
            t0 = time.perf_counter()
            publisher.render(fleet)
            t1 = time.perf_counter()
            nft.apply(text)
            t2 = time.perf_counter()
            publisher.sync(fleet)
            t3 = time.perf_counter()
            times["render"].append(t1 - t0)
            times["bare nft -f"].append(t2 - t1)
            times["sync (agent)"].append(t3 - t2)
        others = {vm.instance_uuid: vm.bindings for vm in fleet}
        requests = [PortRequest(80), PortRequest(443), PortRequest(53, None, None, "udp")]
        for _ in range(rounds):
            t0 = time.perf_counter()
            publisher.allocate(str(uuid.uuid4()), requests, others=others, view=host.host_view())
            times["allocate 1 VM"].append(time.perf_counter() - t0)
    finally:
        publisher.clear()
    return times


async def run(quick: bool, shared: dict[str, Any]) -> Result:
    if os.geteuid() != 0 or shutil.which("nft") is None:
        raise SystemExit("needs root and nft (it changes the host's nftables ruleset)")
    count, rounds = (200, 5) if quick else (1000, 20)
    times = measure(count, rounds)
    print_table(f"ports: {count} VMs × 2 bindings, {rounds} rounds", SUMMARY_HEADER,
                [summary_row(name, values) for name, values in times.items()])
    sync, bare = Summary.of(times["sync (agent)"]).median, Summary.of(times["bare nft -f"]).median
    version = subprocess.run(["nft", "--version"], capture_output=True, text=True).stdout.strip()
    return Result(
        name="ports",
        ratio=sync / bare,
        figures={"VMs": str(count), **{f"{name} ms": fmt(Summary.of(v).median * 1000) for name, v in times.items()}},
        notes=[f"{version}; allocation includes reading the host's sockets (/proc/net) and addresses (psutil)"],
    )
