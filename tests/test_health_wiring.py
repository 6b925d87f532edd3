"""Health checks wired into the agent, on libvirt's test driver (fast; the probes themselves run
against the real guest in tests/test_health_guest.py).

A test-driver VM without a NIC has no address, so its probes never pass: it is `initializing`, then
`unhealthy` once its initializingTimeout passes. That is enough to see every place the state
goes: the activate, restart and inspect replies, the ping's instance records, the metrics,
`<state dir>/health.json` (what `herdsman ls` shows) and the serviceevents the controller gets.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

import libvirt
import pytest

from agent.health import state_file
from agent.health.addresses import ProbeAddresses, forwards
from tests.agent_harness import instance_event, ping, ping_instances, running_agent, vm_instance
from tests.test_metrics import parse, scrape

pytestmark = pytest.mark.timeout(120)

#: with networkMode none: the test driver makes up addresses on 192.168.122.0/24 for VMs with
#: a NIC, where real test guests run; a VM without one has no address and is never probed
CHECK = {"port": 80, "interval": 200, "responseTimeout": 100, "initializingTimeout": 1500,
         "healthyThreshold": 2, "unhealthyThreshold": 3}


def fields_of(reply: dict[str, Any]) -> dict[str, Any]:
    assert reply.get("transitioning") in (None, "no"), reply.get("transitioningMessage")
    return reply["data"]["instanceHostMap"]["instance"]["+data"]["+fields"]


async def inspect(ctl: Any, uuid: str) -> dict[str, Any]:
    reply = await ctl.request("compute.instance.inspect", {"instanceInspect": {"id": uuid, "kind": "virtualMachine"}},
                              resource_type="instanceInspect", resource_id="1ii1")
    assert reply.get("transitioning") in (None, "no"), reply.get("transitioningMessage")
    return reply["data"]["instanceInspect"]


async def eventually(probe: Any, timeout: float = 20) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        found = probe()
        if found:
            return found
        assert time.monotonic() < deadline, "condition never held"
        await asyncio.sleep(0.05)


async def test_health_state_in_replies_pings_metrics_file_and_reports(tmp_path: Path) -> None:
    async with running_agent(tmp_path, metrics_listen="127.0.0.1:0") as (ctl, agent):
        checked = vm_instance("checked", healthCheck=CHECK, startCount=3, networkMode="none")
        plain = vm_instance("plain")
        uuid = checked["uuid"]
        assert fields_of(await instance_event(ctl, "activate", checked))["healthState"] == "initializing"
        assert "healthState" not in fields_of(await instance_event(ctl, "activate", plain))

        records = ping_instances(await ping(ctl))
        assert records[uuid]["healthState"] == "initializing"
        assert "healthState" not in records[plain["uuid"]]
        assert (await inspect(ctl, uuid))["healthState"] == "initializing"
        assert "healthState" not in await inspect(ctl, plain["uuid"])

        # no passing probe: unhealthy once initializingTimeout passed, reported DOWN
        event = await eventually(lambda: next(iter(ctl.service_events), None), timeout=15)
        assert event == {"healthcheckUuid": f"{agent.host_uuid}_{uuid}_3", "reportedHealth": "DOWN",
                         "externalTimestamp": event["externalTimestamp"]}
        assert ping_instances(await ping(ctl))[uuid]["healthState"] == "unhealthy"
        metrics = parse((await scrape(agent.metrics.port))[2].decode())
        assert metrics["herdsman_vm_health"] == [({"uuid": uuid, "health": "unhealthy"}, 1.0)]

        path = tmp_path / "state" / "health.json"
        await eventually(lambda: state_file.read(path).get(uuid) == state_file.VmHealth("unhealthy", 3))
        assert oct(path.stat().st_mode & 0o777) == "0o600"
        assert plain["uuid"] not in state_file.read(path)

        # the controller restarts it: initializing again (it was not healthy), same start count
        assert fields_of(await instance_event(ctl, "restart", checked, process={"timeout": 0}))["healthState"] \
            == "initializing"

        # the controller stops it: no state anywhere, nothing more reported
        await instance_event(ctl, "deactivate", checked, process={"timeout": 0})
        assert "healthState" not in ping_instances(await ping(ctl))[uuid]
        await eventually(lambda: uuid not in state_file.read(path))
        sent = len(ctl.service_events)
        await asyncio.sleep(2.0)  # longer than initializingTimeout: a watched VM would report again
        assert len(ctl.service_events) == sent

        # started again with the next start count: watched again, its reports carry the new count
        checked["startCount"] = 4
        assert fields_of(await instance_event(ctl, "activate", checked))["healthState"] == "initializing"
        await eventually(lambda: any(e["healthcheckUuid"].endswith("_4") for e in ctl.service_events), timeout=15)


async def test_a_restarted_agent_adopts_the_vm_with_its_start_count(tmp_path: Path) -> None:
    """The state file keeps the controller's start count for VMs adopted after a restart
    (libvirt's test driver keeps its domains in the process, so both agents run here)."""
    check = {**CHECK, "initializingTimeout": 60000}
    checked = vm_instance("adopted", healthCheck=check, startCount=7, networkMode="none")
    async with running_agent(tmp_path) as (ctl, _agent):
        await instance_event(ctl, "activate", checked)
        await eventually(lambda: checked["uuid"] in state_file.read(tmp_path / "state" / "health.json"))
    async with running_agent(tmp_path) as (ctl, agent):
        await eventually(lambda: agent.health.health_of(checked["uuid"]))  # adopted in the background
        assert ping_instances(await ping(ctl))[checked["uuid"]]["healthState"] == "initializing"
        assert agent.health._start_count(checked["uuid"]) == 7
        await instance_event(ctl, "purge", checked)


async def test_a_vm_activated_without_its_check_is_no_longer_watched(tmp_path: Path) -> None:
    async with running_agent(tmp_path) as (ctl, _agent):
        inst = vm_instance("dropped", healthCheck=CHECK, networkMode="none")
        assert fields_of(await instance_event(ctl, "activate", inst))["healthState"] == "initializing"
        del inst["data"]["fields"]["healthCheck"]
        assert "healthState" not in fields_of(await instance_event(ctl, "activate", inst))
        assert "healthState" not in ping_instances(await ping(ctl))[inst["uuid"]]


def test_state_file_is_atomic_private_and_says_nothing_when_stale(tmp_path: Path) -> None:
    path = tmp_path / "health.json"
    assert state_file.read(path) == {}
    state_file.write(path, {"a": state_file.VmHealth("healthy", 2), "b": state_file.VmHealth(None, 0)})
    assert state_file.read(path) == {"a": state_file.VmHealth("healthy", 2), "b": state_file.VmHealth(None, 0)}
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert [p.name for p in tmp_path.iterdir()] == ["health.json"]  # no temporary file left
    old = time.time() - state_file.STALE_AFTER - 1
    state_file.write(path, {"a": state_file.VmHealth("healthy", 2)}, now=old)
    assert state_file.read(path) == {}
    assert state_file.read(path, fresh_only=False) == {"a": state_file.VmHealth("healthy", 2)}
    body = json.loads(path.read_text())
    body.update(written=time.time(), pid=_dead_pid())
    path.write_text(json.dumps(body))
    assert state_file.read(path) == {}  # its writer is gone
    path.write_text("{not json")
    assert state_file.read(path) == {}


def _dead_pid() -> int:
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    return pid


def test_forwarded_ports_of_the_session_mode() -> None:
    assert forwards(["127.0.0.1:8080:80/tcp", "0.0.0.0:2222:22/tcp", "127.0.0.1:5353:53/udp", "junk"]) == {
        80: ("127.0.0.1", 8080), 22: ("127.0.0.1", 2222)}


async def test_a_vm_without_an_address_is_looked_up_less_and_less_often(tmp_path: Path) -> None:
    async with running_agent(tmp_path) as (_ctl, agent):
        addresses = ProbeAddresses(agent.driver, session=False, first_retry=0.2)
        absent = "2b0c1b6e-52f4-4a5e-9d53-5c1d5a1d0c11"  # not on this host: no address, ever
        delays = []
        for _ in range(5):
            await addresses.look_up_missing([absent])
            delays.append(addresses._retry[absent][1])
            await addresses.look_up_missing([absent])  # at once again: not due, not looked up
            assert addresses._retry[absent][1] == delays[-1]
            await asyncio.sleep(delays[-1])
        assert delays == [0.2, 0.4, 0.8, 1.6, 3.2]
        assert addresses(absent, 80) is None


async def test_a_vm_stopping_on_its_own_pauses_its_check_and_a_restart_resumes_it(tmp_path: Path) -> None:
    """Stopped outside the agent: no state, no reports; started again (by hand, or by the
    restart policy through `vm_restarted`): watched again, as a restart."""
    conn = libvirt.open("test:///default")  # the same in-process state the agent's driver sees
    try:
        async with running_agent(tmp_path) as (ctl, agent):
            inst = vm_instance("outside", healthCheck={**CHECK, "initializingTimeout": 60000}, startCount=2,
                               networkMode="none")
            uuid = inst["uuid"]
            await instance_event(ctl, "activate", inst)
            dom = conn.lookupByUUIDString(uuid)
            dom.destroy()  # someone used virsh, or qemu died
            await eventually(lambda: agent.health.health_of(uuid) is None)
            assert "healthState" not in ping_instances(await ping(ctl))[uuid]
            assert agent.health.monitor.watching(uuid)  # the state is kept for the restart
            await agent.driver.start_vm(uuid)  # as the restart policy starts it (no host event)...
            agent.health.vm_restarted(uuid)  # ...and then tells health
            assert agent.health.health_of(uuid) == "initializing"
            agent.health.vm_restarted(uuid)  # twice (a host event saw it too): nothing more
            assert agent.health.health_of(uuid) == "initializing"
            dom.destroy()
            await eventually(lambda: agent.health.health_of(uuid) is None)
            dom.create()  # started by hand: the host event resumes it
            await eventually(lambda: agent.health.health_of(uuid) == "initializing")
            assert agent.health._start_count(uuid) == 2
            await instance_event(ctl, "purge", inst)
            assert not agent.health.monitor.watching(uuid)
    finally:
        conn.close()
