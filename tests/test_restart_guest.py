"""The restart policy on the real host: `herdsman run` as a process on qemu:///system (TCG), the
controller double, `virsh destroy` from outside, the agent SIGKILLed and started again.

What a user checks: the VM runs again (or stays off), when; the containerEvents the
controller receives; the record in the domain's metadata (`virsh metadata <vm>
https://herdsman.dev/xmlns/restart/1`); the agent's log. Killed VMs are BIOS-only guests (no
image: qemu starts in a fraction of a second and idles); the power-off over exec needs the
real test guest and its guest agent. One agent for the module; the SIGKILL test restarts it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import libvirt
import pytest
import pytest_asyncio
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from agent.restarts.record import RestartRecord
from drivers.libvirt.restart_store import read_record
from tests.agent_harness import AgentProcess, instance_event, ping, ping_instances, vm_instance
from tests.controller_double import ControllerDouble
from tests.libvirtd_fixtures import SYSTEM_URI, cleanup_test_host, new_test_root, system_connection
from tests.ports_fixtures import drop_table
from tests.test_e2e_guest import guest_manifest, wait_for

pytestmark = [pytest.mark.libvirtd, pytest.mark.guest, pytest.mark.timeout(900),
              pytest.mark.asyncio(loop_scope="module")]


@dataclass
class Host:
    ctl: ControllerDouble
    agent: AgentProcess
    conn: libvirt.virConnect
    dirs: dict[str, Any]
    image: str
    subscriptions: int = 1

    def console(self, uuid: str) -> Path:
        return Path(self.dirs["log_dir"]) / "console" / f"{uuid}.log"

    def dom(self, uuid: str) -> libvirt.virDomain:
        return self.conn.lookupByUUIDString(uuid)

    def record(self, uuid: str) -> RestartRecord | None:
        return read_record(self.dom(uuid))

    def events(self, uuid: str) -> list[str]:
        """The containerEvents' statuses for this VM; a repeat in a row counted once (libvirt
        reports a guest's power-off twice: shutdown, then stopped)."""
        statuses: list[str] = []
        for event in self.ctl.container_events:
            if event["externalId"] == uuid and statuses[-1:] != [event["externalStatus"]]:
                statuses.append(event["externalStatus"])
        return statuses

    def log(self, msg: str, uuid: str) -> list[dict[str, Any]]:
        """The agent's JSON log lines with this message about this VM."""
        lines = []
        for line in self.agent.output().splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if entry.get("msg") == msg and entry.get("instanceUuid") == uuid:
                lines.append(entry)
        return lines

    async def restart_agent(self) -> None:
        self.agent.kill(signal.SIGKILL)
        self.agent.start()
        self.subscriptions += 1
        await self.ctl.wait_subscribed(timeout=120, count=self.subscriptions)

    async def activate(self, inst: dict[str, Any]) -> None:
        reply = await instance_event(self.ctl, "activate", inst, timeout=300)
        assert reply.get("transitioning") is None, reply.get("transitioningMessage")

    async def destroy(self, uuid: str) -> float:
        """`virsh destroy` from outside, as an operator would; when it returned (monotonic)."""
        proc = await asyncio.create_subprocess_exec("virsh", "-q", "-c", SYSTEM_URI, "destroy", uuid,
                                                    stdout=asyncio.subprocess.DEVNULL)
        assert await proc.wait() == 0
        return time.monotonic()

    def starts(self, uuid: str) -> int:
        """How many `start` containerEvents the controller received for this VM."""
        return sum(1 for e in self.ctl.container_events if e["externalId"] == uuid and e["externalStatus"] == "start")

    async def restarted(self, uuid: str, starts: int, since: float, timeout: float = 60) -> float:
        """Seconds from `since` until qemu runs the VM again (libvirt calls it active as its start
        begins: this leaves qemu's start-up time, which varies with the load, mostly out), then
        waits for the controller to hear of it: restart number `starts` + 1, reported once the
        start is complete (a kill before that would make the start itself fail)."""
        dom = self.dom(uuid)
        while not dom.isActive() and self.starts(uuid) <= starts:
            assert time.monotonic() - since < timeout, f"{uuid} not restarted within {timeout} s"
            await asyncio.sleep(0.01)
        seconds = time.monotonic() - since
        while self.starts(uuid) <= starts:
            assert time.monotonic() - since < timeout, f"{uuid}'s restart not reported within {timeout} s"
            await asyncio.sleep(0.02)
        assert dom.isActive()
        return seconds

    async def kill_and_wait(self, uuid: str) -> float:
        """`virsh destroy`, then the seconds until the VM runs again (see `restarted`)."""
        starts = self.starts(uuid)
        return await self.restarted(uuid, starts, await self.destroy(uuid))

    async def stays_off(self, uuid: str, seconds: float) -> None:
        """Shut off now or soon (a guest's power-off is reported as qemu begins to exit), and
        still `seconds` later."""
        dom = self.dom(uuid)
        await until(lambda: not dom.isActive(), 30, f"{uuid} shut off")
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            assert not dom.isActive(), f"{uuid} was started again"
            await asyncio.sleep(0.1)

    async def purge(self, inst: dict[str, Any]) -> None:
        await instance_event(self.ctl, "purge", inst, timeout=120)


async def until(probe: Any, timeout: float = 60, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not probe():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what or probe}"
        await asyncio.sleep(0.05)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def host() -> AsyncIterator[Host]:
    if os.geteuid() != 0:
        pytest.skip("needs root for qemu:///system (run scripts/test as root, as CI does)")
    conn = system_connection()
    token, root = new_test_root()
    dirs: dict[str, Any] = {"state_dir": root / "state", "log_dir": root / "log", "storage_pool": f"hmtest-{token}"}
    table = f"hmt_{token}"
    ctl = ControllerDouble()
    await ctl.start()
    agent = AgentProcess(ctl.url, dirs["state_dir"], dirs["log_dir"], uri=SYSTEM_URI, extra=["--log-format", "json"],
                         env={"HERDSMAN_STORAGE_POOL": dirs["storage_pool"], "HERDSMAN_PORTS_TABLE": table,
                              "HERDSMAN_STREAM_LISTEN": "127.0.0.1:0"})
    try:
        found = Host(ctl, agent, conn, dirs, guest_manifest(root / "images"))
        agent.start()
        await ctl.wait_subscribed(timeout=120)
        yield found
    finally:
        agent.kill(signal.SIGKILL)
        if os.environ.get("HERDSMAN_TEST_SHOW_AGENT_LOG"):
            print(agent.output()[-20000:])
        await ctl.stop()
        cleanup_test_host(conn, root, dirs["storage_pool"])
        drop_table(table)
        conn.close()


def bios_vm(name: str, policy: dict[str, Any] | None) -> dict[str, Any]:
    """No image: SeaBIOS finds nothing to boot and idles (qemu starts in well under a second)."""
    return vm_instance(name, memory_mb=32, networkMode="none", **({"restartPolicy": policy} if policy else {}))


async def test_a_vm_killed_from_outside_is_restarted_with_doubling_backoff(host: Host) -> None:
    inst = bios_vm("restart-always", {"name": "always"})
    uuid = inst["uuid"]
    await host.activate(inst)
    assert host.record(uuid) == RestartRecord.started_by_controller()
    waits = []
    for _ in range(5):  # each kill right after the restart: the VM never ran 10 s
        waits.append(await host.kill_and_wait(uuid))
    print("virsh destroy → qemu started again, s:", [round(w, 2) for w in waits])
    record = host.record(uuid)
    assert record is not None and (record.restart_count, record.last_delay, record.pending) == (5, 1.6, False)
    for n, wait in enumerate(waits):
        assert wait >= 0.1 * 2 ** n, waits  # never before its backoff
    assert waits[-1] > waits[0], waits  # the backoff shows: 1.6 s before the fifth, 0.1 s before the first
    await until(lambda: host.events(uuid) == ["die", "start"] * 5, 30, "five die/start pairs")
    logged = host.log("VM restarted by its restart policy", uuid)
    assert [(e["cause"], e["attempt"], e["delay"]) for e in logged] == [
        ("killed", n + 1, round(0.1 * 2 ** n, 3)) for n in range(5)]
    started = [e for e in host.ctl.container_events if e["externalId"] == uuid and e["externalStatus"] == "start"]
    assert all(set(e) == {"externalId", "externalStatus", "externalTimestamp", "reportedHostUuid"} for e in started)
    assert ping_instances(await ping(host.ctl))[uuid]["state"] == "running"

    # 10 s of running: the backoff is back to 100 ms; the count goes on (docker's, too)
    await asyncio.sleep(10.5)
    wait = await host.kill_and_wait(uuid)
    record = host.record(uuid)
    assert record is not None and (record.restart_count, record.last_delay) == (6, 0.1)
    print(f"after 10 s of running: {wait:.2f} s")
    await host.purge(inst)


async def test_policy_no_leaves_it_stopped(host: Host) -> None:
    inst = bios_vm("restart-no", {"name": "no"})
    uuid = inst["uuid"]
    await host.activate(inst)
    await host.destroy(uuid)
    await host.ctl.wait_container_event(lambda e: e["externalId"] == uuid, timeout=30)
    await host.stays_off(uuid, 3)
    assert host.events(uuid) == ["die"]
    assert ping_instances(await ping(host.ctl))[uuid]["state"] == "stopped"
    [line] = host.log("not restarting a stopped VM", uuid)
    assert (line["cause"], line["reason"]) == ("killed", "restartPolicy is 'no'")
    await host.purge(inst)


async def test_a_controller_deactivate_is_never_undone_and_cancels_a_waiting_restart(host: Host) -> None:
    inst = bios_vm("restart-deactivate", {"name": "always"})
    uuid = inst["uuid"]
    await host.activate(inst)
    reply = await instance_event(host.ctl, "deactivate", inst, process={"timeout": 0})
    assert reply.get("transitioning") is None, reply.get("transitioningMessage")
    assert host.record(uuid) == RestartRecord.stopped()
    await host.stays_off(uuid, 3)
    assert host.events(uuid) == []

    # started again and killed quickly until the next restart waits 1.6 s; deactivated meanwhile
    await host.activate(inst)
    assert host.record(uuid) == RestartRecord.started_by_controller()
    for _ in range(4):
        await host.kill_and_wait(uuid)
    await host.destroy(uuid)
    await until(lambda: (r := host.record(uuid)) is not None and r.pending, 10, "the fifth restart decided")
    assert host.record(uuid) == RestartRecord(5, 1.6, host.record(uuid).last_restart, pending=True)  # type: ignore[union-attr]
    reply = await instance_event(host.ctl, "deactivate", inst, process={"timeout": 0})
    assert reply.get("transitioning") is None, reply.get("transitioningMessage")
    await host.stays_off(uuid, 4)  # well past the 1.6 s the restart waited for
    assert host.record(uuid) == RestartRecord.stopped()
    assert host.events(uuid) == ["die", "start"] * 4 + ["die"]
    assert host.log("VM restarted by its restart policy", uuid)[-1]["attempt"] == 4
    await host.purge(inst)


async def test_maximum_retry_count_holds_across_agent_sigkills(host: Host) -> None:
    inst = bios_vm("restart-retries", {"name": "on-failure", "maximumRetryCount": 6})
    uuid = inst["uuid"]
    await host.activate(inst)
    for _ in range(4):
        await host.kill_and_wait(uuid)
    assert host.record(uuid).restart_count == 4  # type: ignore[union-attr]

    # the fifth restart waits 1.6 s: the agent is killed during that wait
    await host.destroy(uuid)
    await until(lambda: (r := host.record(uuid)) is not None and r.pending, 10, "the fifth restart decided")
    host.agent.kill(signal.SIGKILL)
    assert host.record(uuid) == RestartRecord(5, 1.6, host.record(uuid).last_restart, pending=True)  # type: ignore[union-attr]
    await host.stays_off(uuid, 2.5)  # nobody left to do it
    host.agent.start()
    host.subscriptions += 1
    await host.ctl.wait_subscribed(timeout=120, count=host.subscriptions)
    await host.restarted(uuid, 4, time.monotonic())  # done by the new agent, once, uncounted
    record = host.record(uuid)
    assert record is not None and (record.restart_count, record.pending) == (5, False)

    # killed while no agent runs: the agent finds it shut off (reason: destroyed) and restarts it
    host.agent.kill(signal.SIGKILL)
    await host.destroy(uuid)
    await host.restart_agent()
    await host.restarted(uuid, 5, time.monotonic())
    assert host.record(uuid).restart_count == 6  # type: ignore[union-attr]

    # the sixth was the last: killed again, it stays off, across another agent restart too
    await host.destroy(uuid)
    await host.stays_off(uuid, 3)
    await host.restart_agent()
    await host.stays_off(uuid, 3)
    assert host.record(uuid).restart_count == 6  # type: ignore[union-attr]
    assert host.starts(uuid) == 6
    refusals = host.log("not restarting a stopped VM", uuid)
    assert refusals and all(r["reason"] == "maximumRetryCount 6 reached" and r["level"] == "WARNING" for r in refusals)
    await host.purge(inst)


async def guest_exec(host: Host, inst: dict[str, Any], command: list[str]) -> None:
    """Run a command in the guest as a user would: compute.instance.execute, then the stream."""
    reply = await instance_event(host.ctl, "execute", inst, process={"command": command, "tty": False})
    assert reply.get("transitioning") is None, reply.get("transitioningMessage")
    body = reply["data"]["instanceHostMap"]
    async with connect(f"{body['url']}?token={body['token']}", max_size=None) as ws:
        with contextlib.suppress(ConnectionClosed):  # a power-off ends the stream with the guest
            async with asyncio.timeout(120):
                async for _ in ws:
                    pass


async def test_a_guest_power_off_is_left_by_on_failure_restarted_by_always_and_a_panic_is_a_crash(host: Host) -> None:
    inst = vm_instance("restart-poweroff", memory_mb=160, imageUuid=host.image, networkMode="none",
                       restartPolicy={"name": "on-failure"})
    uuid = inst["uuid"]
    await host.activate(inst)
    await wait_for(host.console(uuid), "HERDSMAN-GUEST: ready", 300)
    await guest_exec(host, inst, ["/sbin/poweroff"])
    await host.ctl.wait_container_event(lambda e: e["externalId"] == uuid and e["externalStatus"] == "stop",
                                        timeout=120)
    await host.stays_off(uuid, 3)
    assert host.events(uuid) == ["stop"]
    reasons = {line["reason"] for line in host.log("not restarting a stopped VM", uuid)}
    assert reasons == {"the guest powered off in order; 'on-failure' restarts only after a failure"}

    inst["data"]["fields"]["restartPolicy"] = {"name": "always"}
    offset = host.console(uuid).stat().st_size
    await host.activate(inst)  # the controller starts it, with the new policy
    await wait_for(host.console(uuid), "HERDSMAN-GUEST: ready", 300, start=offset)
    offset = host.console(uuid).stat().st_size
    await guest_exec(host, inst, ["/sbin/poweroff"])
    await host.ctl.wait_container_event(lambda e: e["externalId"] == uuid and e["externalStatus"] == "start",
                                        timeout=120)
    assert host.events(uuid) == ["stop", "start"]  # the controller's start is its own reply's, not an event
    [line] = host.log("VM restarted by its restart policy", uuid)
    assert (line["cause"], line["attempt"]) == ("poweroff", 1)
    await wait_for(host.console(uuid), "HERDSMAN-GUEST: ready", 300, start=offset)  # it boots again

    # a kernel panic: the pvpanic device, <on_crash>destroy</on_crash>, a `crashed` stop, a
    # counted restart with the backoff (not libvirt resetting the guest in place)
    offset = host.console(uuid).stat().st_size
    await guest_exec(host, inst, ["sh", "-c", "echo c > /proc/sysrq-trigger"])
    await until(lambda: host.starts(uuid) == 2, 120, "the restart after the panic reported")
    assert host.events(uuid) == ["stop", "start", "die", "start"]
    assert [(e["cause"], e["attempt"]) for e in host.log("VM restarted by its restart policy", uuid)] == [
        ("poweroff", 1), ("crashed", 2)]
    assert "Kernel panic" in await wait_for(host.console(uuid), "HERDSMAN-GUEST: ready", 300, start=offset)
    await host.purge(inst)
