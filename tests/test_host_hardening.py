"""The host as a hardened or changed one really is, on the real libvirtd (qemu:///system, TCG):
a 0700 state dir under umask 077, a state dir or pool changed under running VMs, a full disk.

The agent runs as its own process (`herdsman run`), so a SIGKILL and a restart are real.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import stat
import subprocess
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import libvirt
import pytest

from tests.agent_harness import AgentProcess, instance_event, ping, ping_instances, vm_instance
from tests.controller_double import ControllerDouble
from tests.libvirtd_fixtures import SYSTEM_URI, cleanup_test_host, needs_libvirtd, new_test_root
from tests.test_e2e_guest import guest_manifest, wait_for

pytestmark = [pytest.mark.libvirtd, pytest.mark.guest, needs_libvirtd, pytest.mark.timeout(900)]

MARKER = "HARDENED-HOST-OK"
USERDATA = f"#!/bin/sh\necho {MARKER}\n"


@dataclass
class Site:
    """A test's own folder under TEST_ROOT, its pool names, the controller double, its image."""

    root: Path
    token: str
    ctl: ControllerDouble
    image: str
    conn: libvirt.virConnect

    def pool(self, n: int = 1) -> str:
        return f"hmtest-{self.token}-{n}"

    def agent(self, state: str, *, pool: int = 1, umask: int | None = None) -> AgentProcess:
        return AgentProcess(self.ctl.url, self.root / state, self.root / "log", uri=SYSTEM_URI, umask=umask,
                            extra=["--storage-pool", self.pool(pool), "--stream-listen", "127.0.0.1:0"])

    def console_log(self, inst: dict) -> Path:
        return self.root / "log" / "console" / f"{inst['uuid']}.log"

    def domain_ids(self) -> dict[str, int]:
        return {d.UUIDString(): d.ID() for d in self.conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)}


@pytest.fixture
async def site() -> AsyncIterator[Site]:
    token, root = new_test_root()
    conn = libvirt.open(SYSTEM_URI)
    ctl = ControllerDouble()
    await ctl.start()
    try:
        yield Site(root, token, ctl, guest_manifest(root / "images"), conn)
    finally:
        await ctl.stop()
        for n in (1, 2):
            cleanup_test_host(conn, root, f"hmtest-{token}-{n}")
        conn.close()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def agents() -> Iterator[list[AgentProcess]]:
    started: list[AgentProcess] = []
    yield started
    for agent in started:
        agent.kill()


async def start(site: Site, agents: list[AgentProcess], agent: AgentProcess) -> AgentProcess:
    before = len(site.ctl.subscriptions)
    agent.start()
    agents.append(agent)
    await site.ctl.wait_subscribed(timeout=120, count=before + 1)
    return agent


def guest(name: str, site: Site, **fields: object) -> dict:
    return vm_instance(name, memory_mb=128, imageUuid=site.image, userdata=USERDATA, hostname=name, **fields)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def test_a_0700_state_dir_under_umask_077_boots_a_vm(site: Site, agents: list[AgentProcess]) -> None:
    state = site.root / "state"
    state.mkdir(mode=0o700)
    os.chmod(state, 0o700)
    agent = await start(site, agents, site.agent("state", umask=0o077))
    inst = guest("hardened", site, disks=[{"name": "data", "size": "16m"}])
    reply = await instance_event(site.ctl, "activate", inst, timeout=300)
    assert reply.get("transitioning") != "error", reply.get("transitioningMessage")
    await wait_for(site.console_log(inst), MARKER, 300)  # qemu read the seed, the kernel, the disk
    # the folders qemu passes through were opened up, each change logged; nothing more than x
    assert mode(state) == 0o711 and mode(state / "seeds") == 0o711 and mode(state / "pool") == 0o711
    assert "state dir prepared for qemu" in agent.output() and "0700 → 0711" in agent.output()
    assert mode(state / "seeds" / f"{inst['uuid']}.iso") & 0o077 == 0  # files stay private
    await instance_event(site.ctl, "purge", inst, timeout=120)


async def test_a_state_dir_qemu_cannot_reach_refuses_to_start_with_one_line(site: Site) -> None:
    blocked = site.root / "private"
    blocked.mkdir(mode=0o700)
    os.chmod(blocked, 0o700)
    agent = site.agent("private/state")
    agent.start()
    assert agent.proc is not None
    assert agent.proc.wait(timeout=60) == 1
    out = agent.output()
    assert f"qemu (uid {pwd_uid('libvirt-qemu')}) cannot traverse {blocked} (mode 0700)" in out, out[-2000:]
    assert "Fix: chmod o+x" in out
    assert mode(blocked) == 0o700  # the operator's folder is not the agent's to change


def pwd_uid(name: str) -> int:
    import pwd

    return pwd.getpwnam(name).pw_uid


async def test_adoption_after_a_change_of_state_dir_and_of_pool(site: Site, agents: list[AgentProcess]) -> None:
    first = await start(site, agents, site.agent("state-a"))
    vm1 = guest("kept", site, disks=[{"name": "data", "size": "16m"}])
    reply = await instance_event(site.ctl, "activate", vm1, timeout=300)
    assert reply.get("transitioning") != "error", reply.get("transitioningMessage")
    await wait_for(site.console_log(vm1), MARKER, 300)
    ids = site.domain_ids()
    first.kill()

    # 1. another state dir, same pool name: the pool still points at state-a, which holds vm1's
    #    volume, so it is neither used for new VMs nor moved; vm1 is adopted and untouched
    second = await start(site, agents, site.agent("state-b"))
    assert ping_instances(await ping(site.ctl))[vm1["uuid"]]["state"] == "running"
    assert f"storage pool {site.pool()!r} is at {site.root / 'state-a' / 'pool'}" in second.output()
    vm2 = guest("new", site)
    refused = await instance_event(site.ctl, "activate", vm2, timeout=120)
    assert refused["transitioning"] == "error"
    assert "--state-dir" in refused["transitioningMessage"] and site.pool() in refused["transitioningMessage"]
    assert site.conn.lookupByUUIDString(vm1["uuid"]).ID() == ids[vm1["uuid"]]
    with pytest.raises(libvirt.libvirtError):
        site.conn.lookupByUUIDString(vm2["uuid"])
    second.kill()

    # 2. back on state-a with another pool name: the folder belongs to the first pool
    third = await start(site, agents, site.agent("state-a", pool=2))
    assert ping_instances(await ping(site.ctl))[vm1["uuid"]]["state"] == "running"
    refused = await instance_event(site.ctl, "activate", vm2, timeout=120)
    assert refused["transitioning"] == "error" and f"--storage-pool {site.pool()}" in refused["transitioningMessage"]
    assert site.conn.lookupByUUIDString(vm1["uuid"]).ID() == ids[vm1["uuid"]]
    await instance_event(site.ctl, "purge", vm1, timeout=120)  # still purgeable from there
    third.kill()

    # 3. state-a is gone now (the operator deleted it): the stale pool is moved to state-b
    shutil.rmtree(site.root / "state-a")
    fourth = await start(site, agents, site.agent("state-b"))
    assert "moved from" in fourth.output()
    reply = await instance_event(site.ctl, "activate", vm2, timeout=300)
    assert reply.get("transitioning") != "error", reply.get("transitioningMessage")
    pool = site.conn.storagePoolLookupByName(site.pool())
    assert f"<path>{site.root / 'state-b' / 'pool'}</path>" in pool.XMLDesc(0)
    await instance_event(site.ctl, "purge", vm2, timeout=120)


async def test_a_full_disk_fails_cleanly_and_the_agent_goes_on(site: Site, agents: list[AgentProcess]) -> None:
    state = site.root / "state"
    state.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m,mode=0711", "tmpfs", str(state)], check=True)
    try:
        await start(site, agents, site.agent("state"))
        # the kernel image fits; then the disk is filled to the last byte
        ready = await site.ctl.request("storage.image.activate",
                                       {"imageStoragePoolMap": {"image": {"uuid": "i", "name": site.image}}},
                                       resource_type="imageStoragePoolMap", resource_id="isp-1", timeout=120)
        assert ready.get("transitioning") != "error", ready
        filler = state / "filler"
        subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=1M"], capture_output=True)
        before = set(os.listdir(state / "seeds")) if (state / "seeds").exists() else set()
        vm = guest("full", site)
        refused = await instance_event(site.ctl, "activate", vm, timeout=120)
        assert refused["transitioning"] == "error"
        assert "No space left on device" in refused["transitioningMessage"], refused["transitioningMessage"]
        with pytest.raises(libvirt.libvirtError):
            site.conn.lookupByUUIDString(vm["uuid"])
        assert set(os.listdir(state / "seeds")) == before  # no half-written seed
        assert ping_instances(await ping(site.ctl)) is not None  # and the agent serves on
        filler.unlink()
        reply = await instance_event(site.ctl, "activate", vm, timeout=300)
        assert reply.get("transitioning") != "error", reply.get("transitioningMessage")
        await instance_event(site.ctl, "purge", vm, timeout=120)
    finally:
        for agent in agents:
            agent.kill()
        await asyncio.sleep(0.5)
        subprocess.run(["umount", "-l", str(state)], check=False)
