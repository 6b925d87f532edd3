"""Live migration through the agents: `herdsman run` on each of the two test hosts (real
libvirtds, the real test guest under TCG), one controller double for both, events sent to the
agent of the host the VM is on, as Cattle sends them.

The guest's user-data writes `tick N up=S` every 100 ms to a file on its root disk and to its
console. A move must keep the guest running (uptime not reset, the file has every line), bring
console and exec to the destination agent, leave nothing on the source, and be reported once:
the destination's pings list the VM, the source's do not, no container event says it stopped,
died, started or was destroyed. A failure leaves the VM running on the source and nothing on
the destination.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import re
import stat
import subprocess
import sys
import time
import uuid as uuid_module
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import libvirt
import pytest
import pytest_asyncio
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from drivers.libvirt.layout import HostLayout
from tests.agent_harness import REPO, host_map, ping_instances, vm_instance
from tests.controller_double import ControllerDouble
from tests.hosts.env import HostsEnv
from tests.hosts.fixture import hosts_env  # noqa: F401 (fixture)
from tests.hosts.host import Host
from tests.test_e2e_guest import guest_manifest

pytestmark = [pytest.mark.libvirtd, pytest.mark.guest, pytest.mark.timeout(1200),
              pytest.mark.asyncio(loop_scope="module")]

BOOT = 240.0  # a boot under TCG on a shared, busy machine
MOVE = 300.0
LAYOUT = HostLayout()  # the agents' defaults: /var/lib/herdsman, /var/log/herdsman on each host
TICK = re.compile(r"tick (\d+) up=([\d.]+)")
USERDATA = """#!/bin/sh
(
    n=0
    while :; do
        line="tick $n up=$(cut -d' ' -f1 /proc/uptime)"
        echo "$line" >>/mnt/root/ticks
        echo "$line"
        [ $((n % 10)) -eq 9 ] && sync
        n=$((n + 1))
        sleep {interval}
    done
) </dev/null >/dev/console 2>&1 &
echo WRITER-STARTED
"""


@dataclass
class Agents:
    env: HostsEnv
    ctl: ControllerDouble
    image: str
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    vms: list[dict[str, Any]] = field(default_factory=list)
    logs: dict[str, Any] = field(default_factory=dict)

    def start(self, role: str) -> None:
        """`herdsman run` on host `role`, its output in the host's /var/log/herdsman."""
        host = self.host(role)
        if role not in self.logs:
            self.logs[role] = open(host.path(LAYOUT.log_dir) / "agent-migration-test.log", "ab")
        self.procs[role] = host.popen(
            [sys.executable, "-m", "agent", "run", "--url", self.ctl.url, "--access-key", "agent",
             "--secret-key", "secret", "--domain-type", "qemu", "--log-format", "text",
             "--migration-max-outgoing", "1"], cwd=REPO, stdout=self.logs[role], stderr=subprocess.STDOUT)

    def kill(self, role: str) -> None:
        """SIGKILL the agent of `role`, as a crash or the OOM killer would."""
        self.procs[role].kill()
        self.procs[role].wait(timeout=20)

    async def restart(self, role: str) -> None:
        """Start the agent of `role` again and wait until it has subscribed to the controller."""
        subscribed = len(self.ctl.subscriptions)
        self.start(role)
        await self.ctl.wait_subscribed(timeout=120, count=subscribed + 1)

    def host(self, role: str) -> Host:
        return self.env.hosts[role]

    def host_uuid(self, role: str) -> str:
        return self.host(role).path(LAYOUT.state_dir / "host-uuid").read_text().strip()

    def event(self, role: str, name: str, inst: dict[str, Any], *, process: dict[str, Any] | None = None,
              timeout: float = 60) -> dict[str, Any]:
        return self.ctl.make_event(f"compute.instance.{name}", host_map(inst, **(process or {})),
                                   resource_type="instanceHostMap", resource_id=f"ihm-{inst['uuid'][:8]}",
                                   timeoutMillis=int(timeout * 1000))

    async def send(self, role: str, event: dict[str, Any]) -> None:
        assert await self.ctl.send(event, to=self.host(role).address), f"agent {role} is not connected"

    async def request(self, role: str, name: str, inst: dict[str, Any], *, process: dict[str, Any] | None = None,
                      timeout: float = 60) -> dict[str, Any]:
        event = self.event(role, name, inst, process=process, timeout=timeout)
        await self.send(role, event)
        return await self.ctl.wait_reply(event, timeout)

    async def ping(self, role: str) -> dict[str, dict[str, Any]]:
        await self.ctl.wait_peer(self.host(role).address)  # after a cut link it may be reconnecting
        reply = await self.ctl.request("ping", {"options": {"instances": True}, "resources": []},
                                       resource_type="agent", resource_id="2", to=self.host(role).address)
        return ping_instances(reply)

    async def boot(self, name: str, interval: float = 1.0) -> dict[str, Any]:
        """The test guest on A, writing a tick every `interval` s. Only the main test's guest is
        busy (100 ms): a memory-busy TCG guest sometimes crashes after a long migration that
        libvirt calls successful (migration.md §5.4), and the other tests migrate slowly."""
        inst = vm_instance(name, memory_mb=128, imageUuid=self.image, networkMode="bridge",
                           userdata=USERDATA.format(interval=interval),
                           disks=[{"name": "data", "size": "64m"}])
        self.vms.append(inst)
        reply = await self.request("a", "activate", inst, timeout=BOOT)
        assert reply.get("transitioning") is None, reply.get("transitioningMessage")
        await self.wait_console("a", inst, "WRITER-STARTED", BOOT)
        return inst

    def console_log(self, role: str, inst: dict[str, Any]) -> str:
        path = self.host(role).path(LAYOUT.console_log_path(inst["uuid"]))
        try:
            return path.read_bytes().decode(errors="replace")
        except FileNotFoundError:
            return ""

    async def wait_console(self, role: str, inst: dict[str, Any], text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.console_log(role, inst):
            assert "HERDSMAN-GUEST: userdata none" not in self.console_log(role, inst), self.console_log(role, inst)
            assert time.monotonic() < deadline, f"{text!r} not on {role}'s console: {self.console_log(role, inst)[-2000:]}"
            await asyncio.sleep(0.3)

    async def exec(self, role: str, inst: dict[str, Any], script: str) -> str:
        """`sh -c script` in the guest through the agent of `role` (compute.instance.execute →
        its stream server); stdout, after checking the exit code is 0."""
        reply = await self.request(role, "execute", inst,
                                   process={"command": ["sh", "-c", script], "tty": False, "attachStdin": False})
        assert reply.get("transitioning") is None, reply.get("transitioningMessage")
        body = reply["data"]["instanceHostMap"]
        out, controls = bytearray(), []
        async with connect(f"{body['url']}?token={quote(body['token'])}", max_size=None) as ws:
            with contextlib.suppress(ConnectionClosed):
                while True:
                    message = await asyncio.wait_for(ws.recv(), 120)
                    if isinstance(message, str) and message.startswith("{"):
                        controls.append(json.loads(message))
                    else:
                        out += message if isinstance(message, bytes) else base64.b64decode(message)
        exits = [c["exit"] for c in controls if "exit" in c]
        assert exits == [0], (controls, bytes(out[-500:]))
        return out.decode(errors="replace")

    async def console_sees(self, role: str, inst: dict[str, Any], after: int, timeout: float = 60) -> int:
        """Through the agent's console stream: the first tick numbered above `after`."""
        reply = await self.request(role, "console", inst)
        assert reply.get("transitioning") is None, reply.get("transitioningMessage")
        body = reply["data"]["instanceHostMap"]
        text = ""
        async with connect(f"{body['url']}?token={quote(body['token'])}", max_size=None) as ws:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                message = await asyncio.wait_for(ws.recv(), timeout)
                text += (message if isinstance(message, bytes) else base64.b64decode(message)).decode(errors="replace")
                newer = [int(n) for n, _ in TICK.findall(text) if int(n) > after]
                if newer:
                    return newer[0]
        raise AssertionError(f"no tick above {after} on {role}'s console stream: {text[-500:]}")

    def domain(self, role: str, inst: dict[str, Any]) -> tuple[bool, int] | None:
        """(persistent, state) of the VM's domain on `role`, None when it has none."""
        conn = libvirt.open(self.host(role).libvirt_uri)
        try:
            for dom in conn.listAllDomains(0):
                if dom.UUIDString() == inst["uuid"]:
                    return bool(dom.isPersistent()), dom.state()[0]
            return None
        finally:
            conn.close()

    def files(self, role: str, inst: dict[str, Any]) -> list[str]:
        """The VM's volumes, seed and console log on `role`."""
        host = self.host(role)
        pool = host.path(LAYOUT.state_dir / "pool")
        found = [p.name for p in pool.glob(f"{inst['uuid']}-*")] if pool.exists() else []
        if host.path(LAYOUT.seed_path(inst["uuid"])).exists():
            found.append("seed")
        if host.path(LAYOUT.console_log_path(inst["uuid"])).exists():
            found.append("console log")
        return found


def migrate_process(agents: Agents, to: str, **options: Any) -> dict[str, Any]:
    host = agents.host(to)
    process: dict[str, Any] = {"destination": {"libvirtUri": host.tcp_uri, "migrationUri": host.migration_uri,
                                               "hostUuid": agents.host_uuid(to)}}
    if options:
        process["options"] = options
    return process


def ticks(text: str) -> list[tuple[int, float]]:
    return [(int(n), float(up)) for n, up in TICK.findall(text)]


def progress_of(agents: Agents, event: dict[str, Any]) -> list[dict[str, Any]]:
    return agents.ctl.progress_replies(event["replyTo"])


def reply_index(agents: Agents, predicate: Any) -> int:
    return next(i for i, r in enumerate(agents.ctl.replies) if predicate(r))


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def agents(hosts_env: HostsEnv, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Agents]:
    ctl = ControllerDouble()
    await ctl.start(host=hosts_env.root_address)
    folder = Path("/tmp") / f"hm-migrate-{uuid_module.uuid4().hex[:8]}"  # the machine's /tmp: both hosts see it
    folder.mkdir(mode=0o755)
    result = Agents(hosts_env, ctl, guest_manifest(folder))
    try:
        for role in ("a", "b"):
            result.start(role)
        await ctl.wait_subscribed(timeout=120, count=2)
        yield result
    finally:
        for proc in result.procs.values():
            proc.terminate()
        for proc in result.procs.values():
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for log in result.logs.values():
            log.close()
        await ctl.stop()
        for role in ("a", "b"):
            conn = libvirt.open(hosts_env.hosts[role].libvirt_uri)
            try:
                ours = {vm["uuid"] for vm in result.vms}
                for dom in conn.listAllDomains(0):
                    if dom.UUIDString() in ours:
                        with contextlib.suppress(libvirt.libvirtError):
                            dom.destroy()
                        with contextlib.suppress(libvirt.libvirtError):
                            dom.undefine()
                for pool in conn.listAllStoragePools(0):  # the agents' own: the environment as found
                    if pool.name() == "herdsman":
                        with contextlib.suppress(libvirt.libvirtError):
                            pool.destroy()
                        with contextlib.suppress(libvirt.libvirtError):
                            pool.undefine()
            finally:
                conn.close()
        subprocess.run(["rm", "-rf", str(folder)], check=False)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def moved(agents: Agents) -> dict[str, Any]:
    """One VM booted on A: the main test moves it to B, later tests use it there."""
    return await agents.boot(f"mig-main-{uuid_module.uuid4().hex[:6]}", interval=0.1)


async def test_a_vm_writing_to_disk_and_console_moves_to_b_and_lives_on(agents: Agents, moved: dict[str, Any]) -> None:
    inst = moved
    before = float((await agents.exec("a", inst, "cut -d' ' -f1 /proc/uptime")).strip())
    await asyncio.sleep(2)
    event = agents.event("a", "migrate", inst, process=migrate_process(agents, "b"), timeout=MOVE)
    started = time.monotonic()
    await agents.send("a", event)
    reply = await agents.ctl.wait_reply(event, MOVE)
    print(f"\n[migrate] agent A->B: {time.monotonic() - started:.1f} s, reply "
          f"{json.dumps(reply['data'])[:300]}", file=sys.stderr)
    assert reply.get("transitioning") is None, reply.get("transitioningMessage")
    fields = reply["data"]["instanceHostMap"]["instance"]["+data"]["+fields"]
    assert fields["herdsmanState"] == "migrated"
    assert fields["herdsmanMigration"]["hostUuid"] == agents.host_uuid("b")
    progress = progress_of(agents, event)
    assert progress and all(isinstance(p["transitioningProgress"], int) for p in progress)
    assert any("MiB" in p["transitioningMessage"] for p in progress), progress

    # the same request again (a new event id: the controller retried) is answered as done
    repeat = await agents.request("a", "migrate", inst, process=migrate_process(agents, "b"), timeout=60)
    assert repeat.get("transitioning") is None and repeat["data"] == reply["data"], repeat

    # B runs it (persistent: the definition came along); A has nothing of it left
    assert agents.domain("b", inst) == (True, libvirt.VIR_DOMAIN_RUNNING)
    assert agents.domain("a", inst) is None
    assert agents.files("a", inst) == []

    # the guest ran throughout: uptime not reset, every line of the file on its disk (read
    # back from the disk after dropping the guest's caches), ticks going on
    out = await agents.exec("b", inst, "sync; echo 3 >/proc/sys/vm/drop_caches; "
                                       "cut -d' ' -f1 /proc/uptime; cat /mnt/root/ticks")
    uptime, _, rest = out.partition("\n")
    assert float(uptime) > before
    lines = ticks(rest)
    numbers = [n for n, _ in lines]
    assert numbers == list(range(numbers[-1] + 1)), "lines are missing from the file on the guest's disk"
    ups = [u for _, u in lines]
    assert ups == sorted(ups) and ups[-1] > before, "the guest's uptime went backwards"
    # console and exec through B's agent
    assert await agents.console_sees("b", inst, after=numbers[-1]) > numbers[-1]

    # the controller sees it once: in B's pings, not in A's; no container event about it
    deadline = time.monotonic() + 60
    while (seen := (await agents.ping("b")).get(inst["uuid"])) is None:
        assert time.monotonic() < deadline, "B's pings never listed the VM"
        await asyncio.sleep(1)
    assert seen["state"] == "running"
    assert inst["uuid"] not in await agents.ping("a")
    assert [e for e in agents.ctl.container_events if e["externalId"] == inst["uuid"]] == []


async def test_a_cut_link_aborts_and_the_vm_stays_on_a_with_nothing_on_b(agents: Agents) -> None:
    """B is unplugged while memory is copied (2 MiB/s), so nothing moves; after the progress
    timeout the agent aborts. B comes back afterwards (so its libvirtd can drop the incoming
    domain and A's agent remove what it prepared there)."""
    inst = await agents.boot(f"mig-cut-{uuid_module.uuid4().hex[:6]}")
    options = {"bandwidth": 2, "progressTimeout": 6}
    event = agents.event("a", "migrate", inst, process=migrate_process(agents, "b", **options), timeout=MOVE)
    await agents.send("a", event)
    cut = None
    try:
        deadline = time.monotonic() + MOVE
        while cut is None:
            assert time.monotonic() < deadline, progress_of(agents, event)
            for p in progress_of(agents, event):
                if p["transitioningMessage"].startswith("migrating: precopy") and p["transitioningProgress"] >= 5:
                    # mid-way the VM is on both hosts in libvirt, and in one host's pings: A's
                    assert agents.domain("b", inst) is not None
                    assert inst["uuid"] in await agents.ping("a") and inst["uuid"] not in await agents.ping("b")
                    agents.env.set_uplink("b", False)
                    cut = time.monotonic()
                    break
            else:
                await asyncio.sleep(0.2)
        await asyncio.sleep(options["progressTimeout"] + 10)  # the watchdog's time, and a margin
    finally:
        agents.env.set_uplink("b", True)
    reply = await agents.ctl.wait_reply(event, MOVE)
    assert reply.get("transitioning") == "error", reply
    message = reply["transitioningMessage"]
    assert "aborted: stalled: no data moved" in message and "the VM still runs on this host" in message, message

    assert agents.domain("a", inst) == (True, libvirt.VIR_DOMAIN_RUNNING)
    last = ticks(agents.console_log("a", inst))[-1][0]
    await agents.wait_console("a", inst, f"tick {last + 3} ", 60)  # not frozen
    assert agents.domain("b", inst) is None
    assert agents.files("b", inst) == []
    assert inst["uuid"] in await agents.ping("a")
    assert inst["uuid"] not in await agents.ping("b")
    assert [e for e in agents.ctl.container_events if e["externalId"] == inst["uuid"]] == []


async def test_the_destination_killed_mid_way_leaves_the_vm_on_a_and_nothing_on_b(agents: Agents) -> None:
    """The destination dies while memory is copied: its QEMU is killed, as a crashed host's
    would be. The migration fails, the VM runs on A as before, and B keeps nothing."""
    inst = await agents.boot(f"mig-kill-{uuid_module.uuid4().hex[:6]}")
    event = agents.event("a", "migrate", inst, process=migrate_process(agents, "b", bandwidth=2), timeout=MOVE)
    await agents.send("a", event)
    await wait_precopy(agents, event)
    agents.env.b.run(["sh", "-c", f"kill -KILL $(cat /run/libvirt/qemu/{inst['uuid']}.pid)"])
    reply = await agents.ctl.wait_reply(event, MOVE)
    assert reply.get("transitioning") == "error", reply
    assert "the VM still runs on this host" in reply["transitioningMessage"], reply["transitioningMessage"]
    assert agents.domain("a", inst) == (True, libvirt.VIR_DOMAIN_RUNNING)
    last = ticks(agents.console_log("a", inst))[-1][0]
    await agents.wait_console("a", inst, f"tick {last + 3} ", 60)  # running, not left paused
    deadline = time.monotonic() + 60
    while agents.domain("b", inst) is not None or agents.files("b", inst):
        assert time.monotonic() < deadline, (agents.domain("b", inst), agents.files("b", inst))
        await asyncio.sleep(1)
    assert inst["uuid"] in await agents.ping("a") and inst["uuid"] not in await agents.ping("b")
    assert [e for e in agents.ctl.container_events if e["externalId"] == inst["uuid"]] == []


async def wait_precopy(agents: Agents, event: dict[str, Any]) -> None:
    deadline = time.monotonic() + MOVE
    while not any(p["transitioningMessage"].startswith("migrating: precopy") and p["transitioningProgress"] >= 5
                  for p in progress_of(agents, event)):
        assert time.monotonic() < deadline, progress_of(agents, event)
        await asyncio.sleep(0.2)


async def cut_at_precopy(agents: Agents, event: dict[str, Any]) -> None:
    await wait_precopy(agents, event)
    agents.env.set_uplink("b", False)


def libvirtd_log(agents: Agents, role: str) -> Path:
    return agents.host(role).path(Path("/var/log/libvirt/libvirtd.log"))


def environment_failure(agents: Agents, inst: dict[str, Any], reply: dict[str, Any], log_from: int) -> None:
    """A slow migration that failed for a reason of this machine, not of herdsman, is reported
    as an expected failure with its evidence; anything else fails the test. Two such reasons
    were seen here, about one run in five: the TCG guest's kernel panicking (migration.md §5.4;
    Nova's CI sees the same) and B's libvirtd dropping every client from A for keepalive
    timeout at once (A's libvirtd and agent alike). herdsman's answer in both cases is checked:
    an error reply that says where the VM is."""
    if reply.get("transitioning") != "error":
        return
    message = reply["transitioningMessage"]
    for role in ("a", "b"):
        if "Kernel panic" in (console := agents.console_log(role, inst)):
            assert "ended unclearly (lost)" in message or "still runs on this host" in message, message
            panic = console[console.index("Kernel panic"):][:120]
            pytest.xfail(f"the TCG guest panicked on {role.upper()} (migration.md §5.4): {panic!r}; reply: {message}")
    since = libvirtd_log(agents, "b").read_bytes()[log_from:].decode(errors="replace")  # this test's part
    if "connection closed due to keepalive timeout" in since:
        assert "the VM still runs on this host" in message, message
        assert agents.domain("a", inst) == (True, libvirt.VIR_DOMAIN_RUNNING)
        pytest.xfail(f"B's libvirtd dropped A's connections for keepalive timeout; reply: {message}")


async def slow_move_to_b(agents: Agents, inst: dict[str, Any]) -> dict[str, Any]:
    """Start moving `inst` A→B slowly enough to restart an agent meanwhile; returns the event once
    memory is being copied. No auto-converge: its CPU throttling of a TCG guest over a long
    migration is the likeliest trigger of the guest crashes of §5.4."""
    event = agents.event("a", "migrate", inst, process=migrate_process(agents, "b", bandwidth=3, autoConverge=False),
                         timeout=MOVE)
    await agents.send("a", event)
    await wait_precopy(agents, event)
    return event


def full_speed(agents: Agents, inst: dict[str, Any]) -> None:
    """Lift the bandwidth limit of the VM's running migration (as an operator's `virsh
    migrate-setspeed` would): the slow part of a test only needs to last until its restart."""
    conn = libvirt.open(agents.host("a").libvirt_uri)
    try:
        with contextlib.suppress(libvirt.libvirtError):  # over already
            conn.lookupByUUIDString(inst["uuid"]).migrateSetMaxSpeed(8192, 0)
    finally:
        conn.close()


async def test_the_destination_agent_restarted_mid_migration_lists_the_vm_only_once_it_runs_there(
        agents: Agents) -> None:
    """B's agent is killed while the VM comes in and started again: at adoption it finds the
    incoming domain (paused, a `migration in` job) and leaves it out of its pings until it runs."""
    inst = await agents.boot(f"mig-adopt-{uuid_module.uuid4().hex[:6]}")
    log_from = libvirtd_log(agents, "b").stat().st_size
    event = await slow_move_to_b(agents, inst)
    agents.kill("b")
    await agents.restart("b")
    assert agents.domain("b", inst) == (False, libvirt.VIR_DOMAIN_PAUSED), "the migration ended too soon to test"
    listed = inst["uuid"] in await agents.ping("b")
    assert agents.domain("b", inst) == (False, libvirt.VIR_DOMAIN_PAUSED), "the migration ended too soon to test"
    assert not listed, "B's restarted agent listed a VM that still runs on A"
    full_speed(agents, inst)
    reply = await agents.ctl.wait_reply(event, MOVE)
    environment_failure(agents, inst, reply, log_from)
    assert reply.get("transitioning") is None, reply.get("transitioningMessage")
    deadline = time.monotonic() + 60
    while inst["uuid"] not in await agents.ping("b"):
        assert time.monotonic() < deadline, "B's agent never listed the VM that now runs there"
        await asyncio.sleep(1)
    assert [e for e in agents.ctl.container_events if e["externalId"] == inst["uuid"]] == []


async def test_the_source_agent_killed_mid_migration_finishes_it_when_it_is_back(agents: Agents) -> None:
    """A's agent is killed while the VM moves: libvirt carries on. The agent started again finds
    the migration in its journal, sees it through, and removes the VM's files from A; the
    controller's retry of the event (its reply was lost with the agent) is answered as done."""
    inst = await agents.boot(f"mig-src-{uuid_module.uuid4().hex[:6]}")
    log_from = libvirtd_log(agents, "b").stat().st_size
    await slow_move_to_b(agents, inst)
    journal = agents.host("a").path(LAYOUT.state_dir / "migrations" / f"{inst['uuid']}.json")
    assert stat.S_IMODE(journal.stat().st_mode) == 0o600 and '"qemu+tcp://' in journal.read_text()
    agents.kill("a")
    assert agents.domain("b", inst) == (False, libvirt.VIR_DOMAIN_PAUSED), "the migration ended too soon to test"
    await agents.restart("a")
    full_speed(agents, inst)
    retry = await agents.request("a", "migrate", inst, process=migrate_process(agents, "b"), timeout=MOVE)
    environment_failure(agents, inst, retry, log_from)
    assert retry.get("transitioning") is None, retry.get("transitioningMessage")
    fields = retry["data"]["instanceHostMap"]["instance"]["+data"]["+fields"]
    assert fields["herdsmanState"] == "migrated" and fields["herdsmanMigration"]["hostUuid"] == agents.host_uuid("b")
    assert agents.domain("b", inst) == (True, libvirt.VIR_DOMAIN_RUNNING)
    assert agents.domain("a", inst) is None and agents.files("a", inst) == []
    assert not journal.exists()
    log = agents.host("a").path(LAYOUT.log_dir / "agent-migration-test.log").read_text(errors="replace")
    assert f"finishing a migration started earlier uuid={inst['uuid']}" in log
    last = ticks(await agents.exec("b", inst, "cat /mnt/root/ticks"))[-1][0]
    assert await agents.console_sees("b", inst, after=last) > last
    assert inst["uuid"] not in await agents.ping("a")
    assert [e for e in agents.ctl.container_events if e["externalId"] == inst["uuid"]] == []


async def test_a_link_cut_for_good_is_answered_and_b_is_cleaned_once_it_is_back(agents: Agents) -> None:
    """B stays unplugged until A's agent has answered: it does not wait for TCP to give up on
    B (minutes), the VM runs on A; once B is back, what was prepared there is removed."""
    inst = await agents.boot(f"mig-gone-{uuid_module.uuid4().hex[:6]}")
    event = agents.event("a", "migrate", inst, process=migrate_process(agents, "b", bandwidth=2, progressTimeout=6),
                         timeout=MOVE)
    await agents.send("a", event)
    try:
        await cut_at_precopy(agents, event)
        reply = await agents.ctl.wait_reply(event, MOVE)
    finally:
        agents.env.set_uplink("b", True)
    assert reply.get("transitioning") == "error", reply
    message = reply["transitioningMessage"]
    assert "aborted: stalled: no data moved" in message and "the VM still runs on this host" in message, message
    assert "the destination does not answer" in message and "removed once it answers again" in message, message
    assert agents.domain("a", inst) == (True, libvirt.VIR_DOMAIN_RUNNING)
    last = ticks(agents.console_log("a", inst))[-1][0]
    await agents.wait_console("a", inst, f"tick {last + 3} ", 60)
    deadline = time.monotonic() + MOVE
    while agents.domain("b", inst) is not None or agents.files("b", inst):
        assert time.monotonic() < deadline, (agents.domain("b", inst), agents.files("b", inst))
        await asyncio.sleep(1)
    assert inst["uuid"] in await agents.ping("a") and inst["uuid"] not in await agents.ping("b")


async def test_two_migrations_with_a_cap_of_one_queue(agents: Agents) -> None:
    first = await agents.boot(f"mig-q1-{uuid_module.uuid4().hex[:6]}")
    second = await agents.boot(f"mig-q2-{uuid_module.uuid4().hex[:6]}")
    events = [agents.event("a", "migrate", vm, process=migrate_process(agents, "b"), timeout=MOVE)
              for vm in (first, second)]
    for event in events:
        await agents.send("a", event)
    replies = [await agents.ctl.wait_reply(event, 2 * MOVE) for event in events]
    for reply in replies:
        assert reply.get("transitioning") is None, reply.get("transitioningMessage")
    # the two requests race to the slot: one of them waited, and started after the other ended
    queued = [i for i, event in enumerate(events)
              if any("waiting for a migration slot" in p["transitioningMessage"] for p in progress_of(agents, event))]
    assert len(queued) == 1, [progress_of(agents, e)[:2] for e in events]
    waiter, other = events[queued[0]], replies[1 - queued[0]]
    assert progress_of(agents, waiter)[0]["transitioningMessage"] == \
        "migrating: waiting for a migration slot (1 at once; 0 ahead)"
    other_done = reply_index(agents, lambda r: r is other)
    waiter_started = reply_index(agents, lambda r: r.get("name") == waiter["replyTo"]
                                 and "waiting for a migration slot" not in (r.get("transitioningMessage") or ""))
    assert waiter_started > other_done, "the second migration started before the first ended"
    for vm in (first, second):
        assert agents.domain("b", vm) == (True, libvirt.VIR_DOMAIN_RUNNING)
        assert agents.domain("a", vm) is None and agents.files("a", vm) == []


async def test_cancel_reaches_the_running_migration_and_a_repeat_attaches_to_it(
        agents: Agents, moved: dict[str, Any]) -> None:
    """B→A at 2 MiB/s; a second migrate of the same VM (other options) answers with the first's
    outcome; the cancel (not queued behind the migration) aborts it: the VM stays on B."""
    inst = moved
    assert agents.domain("b", inst) is not None, "runs after the main test"
    first = agents.event("b", "migrate", inst, process=migrate_process(agents, "a", bandwidth=2), timeout=MOVE)
    again = agents.event("b", "migrate", inst, process=migrate_process(agents, "a", bandwidth=3), timeout=MOVE)
    await agents.send("b", first)
    deadline = time.monotonic() + MOVE
    while not any("precopy" in p["transitioningMessage"] for p in progress_of(agents, first)):
        assert time.monotonic() < deadline, progress_of(agents, first)
        await asyncio.sleep(0.2)
    await agents.send("b", again)
    await asyncio.sleep(1)
    cancel = await agents.request("b", "migrate.cancel", inst)
    assert cancel.get("transitioning") is None, cancel
    assert cancel["data"]["instanceHostMap"]["instance"]["+data"]["+fields"]["herdsmanMigrationCancelled"] is True
    for event in (first, again):
        reply = await agents.ctl.wait_reply(event, MOVE)
        assert reply.get("transitioning") == "error", reply
        assert reply["transitioningMessage"].startswith("the migration was cancelled; the VM still runs on this host")
    assert agents.domain("b", inst) == (True, libvirt.VIR_DOMAIN_RUNNING)
    deadline = time.monotonic() + 60
    while agents.domain("a", inst) is not None or agents.files("a", inst):
        assert time.monotonic() < deadline, (agents.domain("a", inst), agents.files("a", inst))
        await asyncio.sleep(0.5)
    again_cancel = await agents.request("b", "migrate.cancel", inst)  # nothing runs now: answered, not an error
    assert again_cancel["data"]["instanceHostMap"]["instance"]["+data"]["+fields"]["herdsmanMigrationCancelled"] is False


async def test_bad_process_data_is_refused_naming_the_field(agents: Agents, moved: dict[str, Any]) -> None:
    cases = [
        ({}, "processData.destination: Field required"),
        ({"destination": {"libvirtUri": "qemu+tcp://b/system;reboot"}}, "processData.destination.libvirtUri:"),
        ({"destination": {"host": "b", "migrationUri": "udp://b"}}, "processData.destination.migrationUri:"),
        ({"destination": {"host": "b"}, "options": {"bandwidth": -1}}, "processData.options.bandwidth:"),
        ({"destination": {"host": "b", "hostUuid": agents.host_uuid("b")}},
         "processData.destination.hostUuid: that is this host"),
    ]
    for process, expected in cases:
        reply = await agents.request("b", "migrate", moved, process=process)
        assert reply.get("transitioning") == "error" and expected in reply["transitioningMessage"], (process, reply)
    assert agents.domain("b", moved) == (True, libvirt.VIR_DOMAIN_RUNNING)


async def test_herdsman_migrate_in_the_debug_mode_moves_it_back_to_a(agents: Agents, moved: dict[str, Any]) -> None:
    """`herdsman migrate NAME HOST` on B (a host name: qemu+tcp://HOST/system); A's agent adopts it."""
    b, a = agents.host("b"), agents.host("a")
    result = await asyncio.to_thread(b.run, [sys.executable, "-m", "agent", "migrate", moved["name"], a.hostname,
                                             "--domain-type", "qemu"], cwd=REPO, check=False, timeout=MOVE)
    assert result.returncode == 0, result.stderr
    assert f"{moved['name']}: migrated to qemu+tcp://{a.hostname}/system" in result.stdout
    assert "precopy" in result.stderr or "ended" in result.stderr
    assert agents.domain("a", moved) == (True, libvirt.VIR_DOMAIN_RUNNING)
    assert agents.domain("b", moved) is None and agents.files("b", moved) == []
    deadline = time.monotonic() + 60
    while moved["uuid"] not in await agents.ping("a"):
        assert time.monotonic() < deadline, "A's agent never adopted the VM"
        await asyncio.sleep(1)
    last = ticks(await agents.exec("a", moved, "cat /mnt/root/ticks"))[-1][0]
    assert await agents.console_sees("a", moved, after=last) > last
    # B's daemon saw its VM leave without being asked: not a stop or destroy either
    assert [e for e in agents.ctl.container_events if e["externalId"] == moved["uuid"]] == []
