"""The migration core against the two test hosts (real libvirtds, real test guest under TCG):
destination preparation and its undo, a full migration through the runner, and a network cut
that the watchdog turns into an abort with the VM still running on the source.

`HERDSMAN_RECORD_TRACES=1` rewrites tests/migration_traces/*.json from these runs (the monitor's
replay tests read them).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest

from drivers.libvirt.migration import destination, sockets
from drivers.libvirt.migration.monitor import MIB, Progress
from drivers.libvirt.migration.options import Destination, MigrationOptions
from drivers.libvirt.migration.runner import MigrationResult, migrate
from drivers.libvirt.migration.volumes import PreparationError
from tests.guest.build import ensure_guest
from tests.hosts.env import HostsEnv
from tests.hosts.fixture import hosts_env  # noqa: F401 (fixture)
from tests.hosts.guestvm import MigratableGuest, ticks
from tests.hosts.host import Host

pytestmark = [pytest.mark.libvirtd, pytest.mark.timeout(400)]

TRACES = Path(__file__).parent / "migration_traces"
READY = 180.0


@pytest.fixture
def conns(hosts_env: HostsEnv) -> Iterator[tuple[libvirt.virConnect, libvirt.virConnect]]:
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)  # as the agent does: errors are raised
    a, b = libvirt.open(hosts_env.a.libvirt_uri), libvirt.open(hosts_env.b.libvirt_uri)
    yield a, b
    a.close()
    b.close()


@pytest.fixture
def guest(hosts_env: HostsEnv, conns: tuple[libvirt.virConnect, libvirt.virConnect]) -> Iterator[MigratableGuest]:
    """The test guest's files on host A only (base, seed, overlay); B gets what prepare brings."""
    vm = MigratableGuest.new(ensure_guest(), prefix="hmcore")
    vm.place([hosts_env.a], overlay_on=hosts_env.a)
    yield vm
    for conn in conns:
        for dom in conn.listAllDomains(0):
            if dom.name() == vm.name:
                if dom.isActive():
                    dom.destroy()
                if dom.isPersistent():
                    dom.undefine()
    vm.remove_files([hosts_env.a, hosts_env.b])


def qemu_img_info(host: Host, path: str) -> dict[str, object]:
    return json.loads(host.run(["qemu-img", "info", "-U", "--output=json", path]).stdout)


def test_prepare_brings_base_and_seed_makes_the_overlay_and_undo_removes_exactly_that(
        hosts_env: HostsEnv, conns: tuple[libvirt.virConnect, libvirt.virConnect], guest: MigratableGuest) -> None:
    a, b = hosts_env.a, hosts_env.b
    src, dst = conns
    xml = guest.domain_xml(a.bridge)
    assert not b.path(guest.dir).exists()
    a.path(guest.dir).chmod(0o711)  # like the agent's seed folder: traversable, not listable

    prepared = destination.prepare(src, dst, xml)
    assert b.path(guest.dir).stat().st_mode & 0o777 == 0o711
    for name in ("base.qcow2", "seed.iso"):  # copied through the two libvirtds, byte for byte
        assert b.path(guest.dir / name).read_bytes() == a.path(guest.dir / name).read_bytes()
    overlay = qemu_img_info(b, str(guest.overlay))
    assert overlay["format"] == "qcow2" and overlay["virtual-size"] == 64 * MIB
    assert overlay["backing-filename"] == str(guest.base) and overlay["backing-filename-format"] == "qcow2"
    # the serial log virtlogd will create there is claimed too, so a failed migration leaves none
    assert prepared.paths == [str(guest.seed), str(guest.serial_log), str(guest.base), str(guest.overlay)]
    assert Path(guest.image.kernel).exists()  # the machine's own folder: checked, not copied

    # a second prepare refuses to overwrite the overlay, and its failure removes nothing of the first's
    with pytest.raises(PreparationError, match=r"disk vda \(.*root.qcow2\) already exists on the destination"):
        destination.prepare(src, dst, xml)
    assert sorted(p.name for p in b.path(guest.dir).iterdir()) == ["base.qcow2", "root.qcow2", "seed.iso"]

    destination.undo(dst, prepared)
    assert not b.path(guest.dir).exists()  # files and the folder it made
    assert sorted(p.name for p in a.path(guest.dir).iterdir()) == ["base.qcow2", "root.qcow2", "seed.iso"]


def test_prepare_refuses_a_different_seed_on_the_destination_and_leaves_it_alone(
        hosts_env: HostsEnv, conns: tuple[libvirt.virConnect, libvirt.virConnect], guest: MigratableGuest) -> None:
    a, b = hosts_env.a, hosts_env.b
    seed = a.path(guest.seed).read_bytes()
    other = b.path(guest.seed)
    other.parent.mkdir(mode=0o755, parents=True)
    other.write_bytes(seed.replace(guest.token.encode(), b"f" * len(guest.token)))  # same size
    with pytest.raises(PreparationError, match="exists on the destination with other content"):
        destination.prepare(*conns, guest.domain_xml(a.bridge))
    assert sorted(p.name for p in other.parent.iterdir()) == ["seed.iso"]  # base copied, then removed
    assert other.read_bytes() != seed

    a.path(guest.seed).unlink()
    with pytest.raises(PreparationError, match=f"{guest.seed} does not exist on the source host"):
        destination.prepare(*conns, guest.domain_xml(a.bridge))


def test_prepare_defines_a_missing_pool_like_the_source_and_undo_removes_it(
        hosts_env: HostsEnv, conns: tuple[libvirt.virConnect, libvirt.virConnect], guest: MigratableGuest) -> None:
    """Agent VMs use pool volumes: the destination gets the pool (same name and folder) if new."""
    src, dst = conns
    name = f"hmpool-{guest.token}"
    folder = guest.dir / "pool"
    pool = src.storagePoolDefineXML(f"<pool type='dir'><name>{name}</name><target><path>{folder}</path>"
                                    "</target></pool>", 0)
    pool.build(0)
    pool.create(0)
    try:
        pool.createXML(f"<volume><name>vm-root.qcow2</name><capacity>{32 * MIB}</capacity><target>"
                       f"<format type='qcow2'/></target><backingStore><path>{guest.base}</path>"
                       "<format type='qcow2'/></backingStore></volume>", 0)
        xml = (f"<domain type='qemu'><name>x</name><os><type>hvm</type></os><devices>"
               f"<disk type='volume' device='disk'><driver name='qemu' type='qcow2'/>"
               f"<source pool='{name}' volume='vm-root.qcow2'/><target dev='vda' bus='virtio'/></disk>"
               "</devices></domain>")
        prepared = destination.prepare(src, dst, xml)
        there = dst.storagePoolLookupByName(name)
        assert there.isActive() and there.autostart()
        vol = there.storageVolLookupByName("vm-root.qcow2")
        assert vol.info()[1] == 32 * MIB and f"<path>{guest.base}</path>" in vol.XMLDesc(0)
        destination.undo(dst, prepared)
        assert name not in [p.name() for p in dst.listAllStoragePools(0)]
        assert not hosts_env.b.path(guest.dir).exists()
    finally:
        for vol in pool.listAllVolumes(0):
            vol.delete(0)
        pool.destroy()
        pool.undefine()


def boot(host: Host, conn: libvirt.virConnect, vm: MigratableGuest) -> libvirt.virDomain:
    dom = conn.defineXML(vm.domain_xml(host.bridge))
    dom.create()
    deadline = time.monotonic() + READY
    while "HEARTBEAT-STARTED" not in vm.serial_text(host):
        assert time.monotonic() < deadline, vm.serial_text(host)[-2000:]
        time.sleep(0.2)
    return dom


def record(name: str, result: MigrationResult, started: float, moved_bytes: int, **extra: object) -> None:
    if os.environ.get("HERDSMAN_RECORD_TRACES") != "1":
        return
    TRACES.mkdir(exist_ok=True)
    data = {"recorded": time.strftime("%Y-%m-%d"), "started": 0.0, "moved_bytes": moved_bytes, **extra,
            "samples": [{**dataclasses.asdict(s), "t": round(s.t - started, 3)} for s in result.samples]}
    (TRACES / f"{name}.json").write_text(json.dumps(data, indent=1) + "\n")


async def test_the_runner_migrates_the_test_guest_and_it_lives_on(
        hosts_env: HostsEnv, conns: tuple[libvirt.virConnect, libvirt.virConnect], guest: MigratableGuest) -> None:
    a, b = hosts_env.a, hosts_env.b
    src, dst = conns
    dom = boot(a, src, guest)
    await asyncio.sleep(2)
    seen: list[Progress] = []
    started = time.monotonic()
    result = await migrate(src, dst, dom.UUIDString(),
                           Destination(libvirt_uri=b.tcp_uri, migration_address=b.migration_address),
                           MigrationOptions(), on_progress=seen.append)
    assert result.outcome.verdict == "succeeded", (result.outcome, result.error, result.reason)
    assert result.error is None and result.reason is None and result.cleanup_error is None
    # a fast migration may be over between two samples: progress was reported, and the end
    assert len(seen) >= 2 and seen[0].phase != "ended" and seen[-1].phase == "ended"
    downtime = result.completed.get("downtime")
    print(f"\n[migrate] runner A->B: {result.seconds:.2f} s, downtime {downtime} ms, "
          f"{result.completed.get('memory_processed', 0) / MIB:.0f} MiB memory, "
          f"{len(result.samples)} samples", file=sys.stderr)
    assert isinstance(downtime, int) and downtime > 0
    record("idle-success", result, started, guest.memory_mib * MIB + (1 << 20))

    # gone from A, running and persistent on B, heartbeat continuous
    assert [d.name() for d in src.listAllDomains(0)] == []
    moved = dst.lookupByName(guest.name)
    assert moved.isActive() and moved.isPersistent()
    last_on_a = ticks(guest.serial_text(a))[-1][0]
    deadline = time.monotonic() + 60
    while not ticks(guest.serial_text(b)) or ticks(guest.serial_text(b))[-1][0] < last_on_a + 5:
        assert time.monotonic() < deadline, guest.serial_text(b)[-2000:]
        await asyncio.sleep(0.2)
    numbers = sorted({n for n, _ in ticks(guest.serial_text(a) + guest.serial_text(b))})
    assert numbers == list(range(numbers[0], numbers[-1] + 1))


async def test_a_cut_link_is_aborted_by_the_watchdog_and_the_vm_stays_on_the_source(
        hosts_env: HostsEnv, conns: tuple[libvirt.virConnect, libvirt.virConnect], guest: MigratableGuest) -> None:
    """B's cable is pulled mid-copy and stays out. migrateToURI3 would hang until TCP gives up;
    the watchdog aborts after `progress_timeout` without moved bytes. The abort freezes A's
    guest (QEMU waits on the disk copy's writes to B), so the runner destroys A's sockets to B's
    migration ports: the guest runs on, on A, and B's prepared files go once B's libvirtd has
    dropped the incoming domain, all while B is still unreachable."""
    a, b = hosts_env.a, hosts_env.b
    src, dst = conns
    dom = boot(a, src, guest)
    options = MigrationOptions(bandwidth=2, progress_timeout=6, poll_interval=0.25)
    cut_at: list[float] = []

    def on_progress(progress: Progress) -> None:
        if not cut_at and progress.phase == "precopy" and (progress.percent or 0) >= 5:
            hosts_env.set_uplink("b", False)
            cut_at.append(time.monotonic())

    started = time.monotonic()
    try:
        result = await migrate(src, dst, dom.UUIDString(),
                               Destination(libvirt_uri=b.tcp_uri, migration_address=b.migration_address),
                               options, on_progress=on_progress,
                               release=lambda: a.run(sockets.drop_command(b.migration_address)).stdout)
        assert cut_at, (f"the migration never reached pre-copy: {result.outcome}, error {result.error!r}, "
                        f"reason {result.reason!r}, progress {[p.message() for p in result.progress][-5:]}")
        assert result.outcome.verdict == "failed", result.outcome
        assert result.reason is not None and result.reason.startswith("stalled: no data moved")
        assert result.aborted_at is not None
        aborted = result.aborted_at
        print(f"\n[migrate] link cut: aborted {aborted - cut_at[0]:.1f} s after the cut, verdict after "
              f"{result.seconds:.1f} s, sockets released: {bool(result.released)}, "
              f"cleanup {result.cleanup_error or 'done'}", file=sys.stderr)
        assert aborted - cut_at[0] <= options.progress_timeout + 2
        record("link-cut", result, started, guest.memory_mib * MIB + (1 << 20),
               cut_at=round(cut_at[0] - started, 3),
               options={"progress_timeout": options.progress_timeout, "poll_interval": options.poll_interval,
                        "bandwidth": options.bandwidth})

        # the VM never left A and runs there (its heartbeat goes on), B still unplugged
        assert dom.isActive() and dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
        before = ticks(guest.serial_text(a))[-1][0]
        await asyncio.sleep(2)
        assert ticks(guest.serial_text(a))[-1][0] > before, "the guest on A is frozen"
        # nothing of it on B: no domain, and the files prepare made are gone
        assert [d.name() for d in dst.listAllDomains(0)] == []
        assert result.cleanup_error is None
        assert not b.path(guest.dir).exists()
    finally:
        hosts_env.set_uplink("b", True)
