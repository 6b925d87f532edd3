"""The two-host test environment (tests/hosts) proves itself: two separate libvirt hosts on one
LAN, a real live migration between them with plain libvirt, an agent on host B talking to a
controller in the root namespace, and a killed session's leftovers reaped.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import libvirt
import pytest

from tests.agent_harness import REPO, ping
from tests.controller_double import ControllerDouble
from tests.guest.build import ensure_guest
from tests.guest.test_guest_boot import agent_exec, wait_agent
from tests.hosts import env as envs
from tests.hosts.env import HostsEnv
from tests.hosts.fixture import hosts_env  # noqa: F401 (fixture)
from tests.hosts.guestvm import HTTP_PORT, MigratableGuest, ticks

pytestmark = [pytest.mark.libvirtd, pytest.mark.timeout(300)]

READY = 180.0  # TCG on a shared 2-core machine


def wait_text(read, pattern: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while True:
        text = read()
        if pattern in text:
            return text
        if time.monotonic() > deadline:
            raise AssertionError(f"{pattern!r} not seen within {timeout:.0f} s:\n{text[-3000:]}")
        time.sleep(0.1)


def test_two_separate_libvirt_hosts_on_one_lan(hosts_env: HostsEnv) -> None:
    a, b = hosts_env.a, hosts_env.b
    conn_a, conn_b = libvirt.open(a.libvirt_uri), libvirt.open(b.libvirt_uri)
    try:
        # distinct host uuids (libvirt refuses a migration between equal ones), own hostnames
        assert a.host_uuid != b.host_uuid
        assert f"<uuid>{a.host_uuid}</uuid>" in conn_a.getCapabilities()
        assert f"<uuid>{b.host_uuid}</uuid>" in conn_b.getCapabilities()
        assert (conn_a.getHostname(), conn_b.getHostname()) == (a.hostname, b.hostname)
        # nothing of the main daemon's: no domains, no pools; and a pool on A is not on B
        assert conn_a.listAllDomains(0) == [] and conn_b.listAllDomains(0) == []
        pool = conn_a.storagePoolDefineXML(
            "<pool type='dir'><name>hm-only-a</name><target><path>/var/lib/libvirt/images</path>"
            "</target></pool>", 0)
        try:
            assert [p.name() for p in conn_b.listAllStoragePools(0)] == []
        finally:
            pool.undefine()
    finally:
        conn_a.close()
        conn_b.close()

    # A's libvirtd reaches B's over the LAN by address and by name (/etc/hosts)
    assert a.run(["virsh", "-c", b.tcp_uri, "hostname"]).stdout.strip() == b.hostname
    assert a.run(["virsh", "-c", f"qemu+tcp://{b.hostname}/system", "uri"]).returncode == 0
    # what a process on a host sees: its bridge and address, its cgroup root, kvm as udev makes it
    out = b.run(["sh", "-c", "ip -o -4 addr show dev br0; cat /proc/self/cgroup; "
                 "stat -c '%U:%G %a' /dev/kvm 2>/dev/null || echo no-kvm; hostname"]).stdout
    assert f"inet {b.address}/24" in out
    assert "1:cpu:/\n" in out or ":cpu:/\n" in out
    assert "root:kvm 660" in out or "no-kvm" in out
    assert out.strip().endswith(b.hostname)


def test_test_guest_migrates_live_from_a_to_b(hosts_env: HostsEnv) -> None:
    """Plain libvirt: LIVE|PEER2PEER|PERSIST_DEST|UNDEFINE_SOURCE|NON_SHARED_INC, overlay made on
    B first. The oracle is the guest, not the call's return: it keeps ticking on B with its
    uptime, its disk and base image are there, its NIC answers through B's bridge."""
    a, b = hosts_env.a, hosts_env.b
    guest = MigratableGuest.new(ensure_guest(), prefix="hmenv")
    conn_a, conn_b = libvirt.open(a.libvirt_uri), libvirt.open(b.libvirt_uri)
    try:
        guest.place([a, b], overlay_on=a)
        dom = conn_a.defineXML(guest.domain_xml(a.bridge))
        dom.create()
        boot = wait_text(lambda: guest.serial_text(a), "HEARTBEAT-STARTED", READY)
        assert f"BASE-MARKER base-{guest.token}" in boot
        lease = [line.split()[-1].split("/")[0] for line in boot.splitlines()
                 if line.startswith("HERDSMAN-GUEST: net eth0 ")]
        assert lease and lease[0].startswith(hosts_env.lan.prefix + "."), boot[-2000:]
        address = lease[0]
        wait_agent(dom, 60)
        _, before = agent_exec(dom, "/bin/cat", "/proc/uptime")
        uptime_before = float(before.split()[0])
        wait_text(lambda: guest.serial_text(a), "tick 10 ", 30)

        guest.create_overlay(b)
        flags = (libvirt.VIR_MIGRATE_LIVE | libvirt.VIR_MIGRATE_PEER2PEER
                 | libvirt.VIR_MIGRATE_PERSIST_DEST | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE
                 | libvirt.VIR_MIGRATE_NON_SHARED_INC)
        params = {libvirt.VIR_MIGRATE_PARAM_URI: b.migration_uri,
                  libvirt.VIR_MIGRATE_PARAM_MIGRATE_DISKS: ["vda"]}
        started = time.monotonic()
        dom.migrateToURI3(b.tcp_uri, params, flags)
        seconds = time.monotonic() - started

        # the domain now lives on B (persistent), and nowhere on A
        assert [d.name() for d in conn_a.listAllDomains(0)] == []
        moved = conn_b.lookupByName(guest.name)
        assert moved.isActive() and moved.isPersistent()
        stats = moved.jobStats(libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED)
        print(f"\n[hosts] migration A->B {seconds:.2f} s, downtime {stats.get('downtime')} ms, "
              f"{stats.get('disk_processed', 0) >> 20} MiB disk, "
              f"{stats.get('memory_processed', 0) >> 20} MiB memory", file=sys.stderr)

        # the heartbeat goes on on B: the ticks across both serial logs have no gap, and B's
        # continue with an uptime that was not reset
        last_on_a = ticks(guest.serial_text(a))[-1][0]
        wait_text(lambda: guest.serial_text(b), f"tick {last_on_a + 10} ", 60)
        seen = ticks(guest.serial_text(a) + guest.serial_text(b))
        numbers = sorted({n for n, _ in seen})
        assert numbers == list(range(numbers[0], numbers[-1] + 1)), "ticks lost across the move"
        uptimes = [up for _, up in seen]
        assert uptimes == sorted(uptimes) and uptimes[-1] > uptime_before

        # the guest agent works on B; the disk came along (every tick synced on A is in the
        # file, read from B's disk once the guest's page cache is dropped); the base is there
        wait_agent(moved, 30)
        _, after = agent_exec(moved, "/bin/cat", "/proc/uptime")
        assert float(after.split()[0]) > uptime_before
        code, text = agent_exec(moved, "/bin/sh", "-c",
                                "sync; echo 3 >/proc/sys/vm/drop_caches; "
                                "cat /mnt/root/base-marker /mnt/root/ticks")
        assert code == 0 and text.startswith(f"base-{guest.token}\n")
        on_disk = [n for n, _ in ticks(text)]
        assert on_disk == list(range(len(on_disk))) and on_disk[-1] > last_on_a

        # its NIC answers from B's bridge (QEMU's announce moved its MAC to B's uplink)
        with urllib.request.urlopen(f"http://{address}:{HTTP_PORT}/", timeout=10) as reply:
            assert reply.read().decode().strip() == guest.token
    finally:
        for conn in (conn_a, conn_b):
            for d in conn.listAllDomains(0):
                if d.name() == guest.name:
                    if d.isActive():
                        d.destroy()
                    d.undefine()
            conn.close()
        guest.remove_files([a, b])


async def test_an_agent_on_host_b_serves_a_controller_in_the_root_namespace(hosts_env: HostsEnv) -> None:
    """`herdsman run` on host B (its own libvirtd and /var/lib/herdsman) subscribes to a
    controller double listening on the root namespace's LAN address, and answers its ping."""
    b = hosts_env.b
    ctl = ControllerDouble()
    await ctl.start(host=hosts_env.root_address)
    log = open(b.path("/var/log/herdsman") / "agent-test.log", "wb")
    agent = b.popen([sys.executable, "-m", "agent", "run", "--url", ctl.url, "--access-key", "agent",
                     "--secret-key", "secret", "--domain-type", "qemu", "--log-format", "text"],
                    cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    try:
        await ctl.wait_subscribed(timeout=60)
        reply = await ping(ctl)
        host = next(r for r in reply["data"]["resources"] if r["type"] == "host")
        assert host["hostname"] == b.hostname
        # its state is in host B's private /var/lib/herdsman, not the machine's
        host_uuid = b.path(b.agent_state_dir) / "host-uuid"
        assert host_uuid.read_text().strip() == host["uuid"]
    finally:
        agent.kill()
        agent.wait(timeout=10)
        log.close()
        await ctl.stop()


def test_a_killed_sessions_environment_is_reaped(hosts_env: HostsEnv) -> None:
    """An environment whose owner died (a test run that was SIGKILLed) is torn down by the next
    run: its processes, namespaces, cgroups and files go; live environments stay."""
    owner = subprocess.Popen(["sleep", "300"])
    try:
        stale = envs.up(f"stale-{os.getpid()}", owner=envs.process_identity(owner.pid))
    finally:
        owner.send_signal(signal.SIGKILL)
        owner.wait()
    pids = [h.holder_pid for h in stale.hosts.values()]
    assert all(Path(f"/proc/{pid}").exists() for pid in pids)

    assert stale.name in envs.reap_stale()
    assert not any(Path(f"/proc/{pid}").exists() for pid in pids)
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert f"hmh{stale.slot}-" not in netns
    assert subprocess.run(["ip", "link", "show", stale.lan.root_link], capture_output=True).returncode != 0
    assert not any(p.exists() for group in stale.cgroups.values() for p in group)
    assert not stale.dir.exists()
    # the session's own environment is untouched
    assert hosts_env.dir.exists() and Path(f"/proc/{hosts_env.a.holder_pid}").exists()
