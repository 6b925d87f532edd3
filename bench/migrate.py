"""migrate: the test guest moved live between the two test hosts, herdsman's runner vs `virsh migrate`.

Two namespaced libvirtds on this machine (tests/hosts), the test guest (TCG) with 256 MiB and
with 1 GiB of RAM, its root disk a qcow2 overlay copied incrementally. The same running guest goes back and forth:
A→B through `drivers.libvirt.migration.runner.migrate` (prepare the destination, migrate,
watch, verdict from both hosts), then B→A with
`virsh migrate --live --p2p --persistent --undefinesource --copy-storage-inc --migrate-disks vda`
after making the overlay on A by hand (untimed). The ratio divides the runner's median time
from the migrate call to its verdict by virsh's median command time; the runner's total with
its destination preparation is shown next to it. Downtime is libvirt's, from the destination's
jobStats(COMPLETED) after each migration; the guest's own is the longest gap between the lines
it writes every 20 ms to a TCP connection to the bench (tests/hosts/guestvm.py), minus those
20 ms. Also shown: how long the two hosts took to come up.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import threading
import time
from typing import Any

import libvirt

from bench.common import SUMMARY_HEADER, Result, Summary, Target, ms, print_table, summary_row
from drivers.libvirt.migration.options import Destination, MigrationOptions
from drivers.libvirt.migration.runner import migrate
from tests.guest.build import ensure_guest
from tests.hosts.env import HostsEnv, current_owner, up
from tests.hosts.guestvm import MigratableGuest
from tests.hosts.host import Host


SIZES_MIB = (256, 1024)
BEACON_EVERY = 0.02


class _Beacon:
    """Arrival times of the guest's lines (a thread: the bench's loop blocks in libvirt calls)."""

    def __init__(self, address: str) -> None:
        self.server = socket.create_server((address, 0))
        self.port = self.server.getsockname()[1]
        self.arrivals: list[float] = []
        self._thread = threading.Thread(target=self._run, name="beacon", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            conn, _ = self.server.accept()
        except OSError:
            return  # closed before the guest connected
        with conn:
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            while conn.recv(4096):
                self.arrivals.append(time.monotonic())

    def gap(self, start: float, end: float) -> float:
        """The guest's longest silence between `start` and `end` beyond its 20 ms rhythm (s)."""
        times = [t for t in self.arrivals if start <= t <= end]
        if len(times) < 2:
            raise RuntimeError("the guest's beacon did not arrive during the migration")
        return max(b - a for a, b in zip(times, times[1:])) - BEACON_EVERY

    def close(self) -> None:
        self.server.close()


def _remove_overlay(host: Host, vm: MigratableGuest) -> None:
    """What the source agent does after a move: the old overlay goes (base and seed stay)."""
    host.path(vm.overlay).unlink(missing_ok=True)


def _virsh_migrate(src: Host, dst: Host, vm: MigratableGuest) -> float:
    argv = ["virsh", "-c", src.libvirt_uri, "migrate", "--live", "--p2p", "--persistent", "--undefinesource",
            "--copy-storage-inc", "--migrate-disks", "vda", "--migrateuri", dst.migration_uri,
            vm.name, dst.tcp_uri]
    started = time.perf_counter()
    subprocess.run(argv, check=True, capture_output=True, text=True)
    return time.perf_counter() - started


async def measure(env: HostsEnv, rounds: int, memory_mib: int) -> dict[str, list[float]]:
    a, b = env.a, env.b
    found: dict[str, list[float]] = {k: [] for k in (  # all in seconds
        "runner total", "runner migrate", "virsh migrate", "runner downtime", "virsh downtime",
        "runner guest downtime", "virsh guest downtime")}
    beacon = _Beacon(env.root_address)
    vm = MigratableGuest.new(ensure_guest(), prefix="hmbench", memory_mib=memory_mib,
                             beacon=(env.root_address, beacon.port))
    conn_a, conn_b = libvirt.open(a.libvirt_uri), libvirt.open(b.libvirt_uri)
    try:
        vm.place([a], overlay_on=a)
        dom = conn_a.defineXML(vm.domain_xml(a.bridge))
        dom.create()
        deadline = time.monotonic() + 300
        while "HEARTBEAT-STARTED" not in vm.serial_text(a) or len(beacon.arrivals) < 50:
            if time.monotonic() > deadline:
                raise TimeoutError("the test guest did not start its heartbeat and beacon")
            await asyncio.sleep(0.2)
        dest_b = Destination(libvirt_uri=b.tcp_uri, migration_address=b.migration_address)
        for _ in range(rounds):
            started, window = time.perf_counter(), time.monotonic()
            result = await migrate(conn_a, conn_b, dom.UUIDString(), dest_b, MigrationOptions())
            total = time.perf_counter() - started
            await asyncio.sleep(1)  # the guest's first lines from B
            found["runner guest downtime"].append(beacon.gap(window, time.monotonic()))
            if result.outcome.verdict != "succeeded":
                raise RuntimeError(f"runner: {result.outcome.message} ({result.error or result.reason})")
            found["runner total"].append(total)
            found["runner migrate"].append(result.seconds)
            found["runner downtime"].append(result.completed.get("downtime", float("nan")) / 1000)

            _remove_overlay(a, vm)
            vm.create_overlay(a)
            window = time.monotonic()
            found["virsh migrate"].append(_virsh_migrate(b, a, vm))
            await asyncio.sleep(1)
            found["virsh guest downtime"].append(beacon.gap(window, time.monotonic()))
            dom = conn_a.lookupByName(vm.name)
            stats = dom.jobStats(libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED)
            found["virsh downtime"].append(stats.get("downtime", float("nan")) / 1000)
            _remove_overlay(b, vm)
    finally:
        for conn in (conn_a, conn_b):
            for d in conn.listAllDomains(0):
                if d.name() == vm.name:
                    if d.isActive():
                        d.destroy()
                    d.undefine()
            conn.close()
        vm.remove_files([a, b])
        beacon.close()
    return found


async def run(quick: bool, shared: dict[str, Any]) -> Result:
    if os.geteuid() != 0:
        raise SystemExit("migrate: needs root (two namespaced libvirtds)")
    rounds = 2 if quick else 3
    env = up(f"bench-{os.getpid()}", owner=current_owner())
    try:
        by_size = {size: await measure(env, rounds, size) for size in SIZES_MIB}
    finally:
        env.down()
    hosts_up = env.timings["up_s"]
    figures: dict[str, Any] = {"hosts up ms": ms(hosts_up)}
    ratios = []
    for size, found in by_size.items():
        print_table(f"migrate: test guest ({size} MiB, TCG) between two namespaced hosts, {rounds} rounds each way",
                    SUMMARY_HEADER, [summary_row(k, v) for k, v in found.items()])
        ratios.append(Summary.of(found["runner migrate"]).median / Summary.of(found["virsh migrate"]).median)
        figures.update({f"{size} MiB {k} ms": ms(Summary.of(v).median) for k, v in found.items()})
    ratio = max(ratios)
    return Result(
        name="migrate",
        ratio=ratio,
        figures=figures,
        targets=[Target("migration time, runner/virsh migrate (the worse size)", ratio, 1.10, "×"),
                 Target("both test hosts up (warm capabilities cache)", hosts_up, 5.0, " s")],
        notes=["the runner's time is from the migrate call to its verdict (both hosts' states); "
               "its total adds the destination's preparation, which virsh leaves to the caller",
               "downtime: libvirt's figure, and the guest's own (its longest silence, a line every 20 ms)"],
    )
