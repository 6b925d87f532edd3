"""The restart policy through the real agent (websocket, handlers, driver, runner) on libvirt's
test driver: what the controller hears, and that its own stops are never undone. The real
guest's side (qemu killed from outside, an agent SIGKILLed) is tests/test_restart_guest.py."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import libvirt
import pytest

from agent.restarts.record import RestartRecord
from drivers.libvirt.restart_store import read_record, write_record
from tests.agent_harness import instance_event, ping, ping_instances, running_agent, vm_instance

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def test_conn():
    conn = libvirt.open("test:///default")  # the same in-process state the agent's driver sees
    yield conn
    conn.close()


def events_of(ctl: Any, uuid: str) -> list[str]:
    return [e["externalStatus"] for e in ctl.container_events if e["externalId"] == uuid]


async def until(check: Any, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not check():
            await asyncio.sleep(0.01)


async def test_a_vm_killed_from_outside_is_restarted_and_the_controller_hears_die_then_start(
        tmp_path, test_conn, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="herdsman.restarts")
    async with running_agent(tmp_path) as (ctl, agent):
        heard: list[str] = []
        agent.vm_restarted_listeners.append(heard.append)
        inst = vm_instance("policy-always", restartPolicy={"name": "always"})
        uuid = inst["uuid"]
        assert (await instance_event(ctl, "activate", inst)).get("transitioning") is None
        dom = test_conn.lookupByUUIDString(uuid)
        assert read_record(dom) == RestartRecord.started_by_controller()

        dom.destroy()  # someone used virsh
        start = await ctl.wait_container_event(lambda e: e["externalId"] == uuid and e["externalStatus"] == "start",
                                               timeout=5)
        assert dom.isActive()
        assert events_of(ctl, uuid) == ["die", "start"]
        assert start == {"externalId": uuid, "externalStatus": "start", "externalTimestamp": start["externalTimestamp"],
                         "reportedHostUuid": agent.host_uuid}
        assert isinstance(start["externalTimestamp"], int) and abs(start["externalTimestamp"] - time.time()) < 5
        assert heard == [uuid]
        record = read_record(dom)
        assert record is not None and (record.restart_count, record.pending, record.last_delay) == (1, False, 0.1)
        [line] = [r for r in caplog.records if r.getMessage() == "VM restarted by its restart policy"]
        assert (line.instanceUuid, line.cause, line.attempt) == (uuid, "killed", 1)  # type: ignore[attr-defined]
        assert 0.1 <= line.delay < 1  # type: ignore[attr-defined]
        assert ping_instances(await ping(ctl))[uuid]["state"] == "running"

        # the controller's own restart starts the count again and is not reported as a host event
        await instance_event(ctl, "restart", inst, process={"timeout": 0})
        assert read_record(dom) == RestartRecord.started_by_controller()
        await asyncio.sleep(0.3)
        assert events_of(ctl, uuid) == ["die", "start"]
        await instance_event(ctl, "purge", inst)


@pytest.mark.parametrize("policy", [None, {"name": "no"}])
async def test_without_a_restart_policy_a_killed_vm_stays_stopped(tmp_path, test_conn, policy) -> None:
    async with running_agent(tmp_path) as (ctl, agent):
        inst = vm_instance("policy-no", **({"restartPolicy": policy} if policy else {}))
        await instance_event(ctl, "activate", inst)
        dom = test_conn.lookupByUUIDString(inst["uuid"])
        dom.destroy()
        await ctl.wait_container_event(lambda e: e["externalId"] == inst["uuid"], timeout=5)
        await asyncio.sleep(0.5)
        assert not dom.isActive() and events_of(ctl, inst["uuid"]) == ["die"]
        assert read_record(dom) == RestartRecord.started_by_controller()
        await instance_event(ctl, "purge", inst)


async def test_a_controller_stop_is_never_undone_and_cancels_a_waiting_restart(tmp_path, test_conn) -> None:
    async with running_agent(tmp_path) as (ctl, agent):
        inst = vm_instance("policy-stop", restartPolicy={"name": "always"})
        uuid = inst["uuid"]
        await instance_event(ctl, "activate", inst)
        dom = test_conn.lookupByUUIDString(uuid)
        await instance_event(ctl, "deactivate", inst, process={"timeout": 0})
        assert read_record(dom) == RestartRecord.stopped()
        await asyncio.sleep(0.5)
        assert not dom.isActive() and events_of(ctl, uuid) == []

        # started again, then failing quickly for a while: the next restart waits 51.2 s
        await instance_event(ctl, "activate", inst)
        write_record(dom, RestartRecord(8, 25.6, time.time() - 1))
        dom.destroy()
        await until(lambda: uuid in agent.restarts.waiting and read_record(dom).pending)  # type: ignore[union-attr]
        await instance_event(ctl, "deactivate", inst, process={"timeout": 0})
        assert agent.restarts.waiting == set()
        assert read_record(dom) == RestartRecord.stopped()
        assert not dom.isActive() and events_of(ctl, uuid) == ["die"]
        await instance_event(ctl, "purge", inst)


async def test_created_stopped_is_never_started_by_the_policy(tmp_path, test_conn) -> None:
    async with running_agent(tmp_path) as (ctl, agent):
        inst = vm_instance("policy-created", restartPolicy={"name": "always"}, startOnCreate=False)
        await instance_event(ctl, "activate", inst)
        dom = test_conn.lookupByUUIDString(inst["uuid"])
        assert not dom.isActive() and read_record(dom) == RestartRecord.stopped()
        await agent.driver.restarts.adopt(agent.driver._conn.get())  # as after an agent restart
        await asyncio.sleep(0.3)
        assert not dom.isActive() and events_of(ctl, inst["uuid"]) == []
        await instance_event(ctl, "purge", inst)


async def test_an_agent_back_from_the_dead_finishes_a_pending_restart_once(tmp_path, test_conn) -> None:
    inst = vm_instance("policy-pending", restartPolicy={"name": "on-failure", "maximumRetryCount": 2})
    uuid = inst["uuid"]
    async with running_agent(tmp_path) as (ctl, agent):
        await instance_event(ctl, "activate", inst)
    dom = test_conn.lookupByUUIDString(uuid)
    # what an agent killed during the backoff leaves: the VM shut off, its restart decided
    dom.destroy()
    pending = RestartRecord(1, 0.1, time.time() - 0.5, pending=True)
    write_record(dom, pending)
    async with running_agent(tmp_path) as (ctl, agent):
        await ctl.wait_container_event(lambda e: e["externalId"] == uuid and e["externalStatus"] == "start", timeout=10)
        assert dom.isActive()
        assert read_record(dom) == RestartRecord(1, 0.1, pending.last_restart, False)  # not counted twice
        # one retry left, then none
        dom.destroy()
        await until(lambda: len([s for s in events_of(ctl, uuid) if s == "start"]) == 2)
        dom.destroy()
        await asyncio.sleep(0.5)
        assert not dom.isActive() and read_record(dom).restart_count == 2  # type: ignore[union-attr]
        assert events_of(ctl, uuid) == ["start", "die", "start", "die"]
        await instance_event(ctl, "purge", inst)


async def test_a_new_spec_for_a_running_vm_keeps_its_count_in_the_persistent_definition(tmp_path, test_conn) -> None:
    async with running_agent(tmp_path) as (ctl, agent):
        inst = vm_instance("policy-respec", restartPolicy={"name": "on-failure", "maximumRetryCount": 5})
        uuid = inst["uuid"]
        await instance_event(ctl, "activate", inst)
        dom = test_conn.lookupByUUIDString(uuid)
        dom.destroy()
        await until(lambda: events_of(ctl, uuid) == ["die", "start"])
        inst["data"]["fields"]["labels"] = {"changed": "yes"}
        inst["memoryMb"] = 48  # a new domain definition: its metadata is written anew
        reply = await instance_event(ctl, "activate", inst)
        assert reply["data"]["instanceHostMap"]["instance"]["+data"]["+fields"].get("restartRequired") in (True, None)
        config = libvirt.VIR_DOMAIN_AFFECT_CONFIG
        stored = test_conn.lookupByUUIDString(uuid).metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT,
                                                             "https://herdsman.dev/xmlns/restart/1", config)
        assert '"restartCount":1' in stored  # not lost, not reset: the VM kept running
        dom.destroy()
        await until(lambda: events_of(ctl, uuid) == ["die", "start", "die", "start"])
        assert read_record(dom).restart_count == 2  # type: ignore[union-attr]
        await instance_event(ctl, "purge", inst)


def test_restart_notices_send_the_event_then_tell_every_listener_even_after_one_fails() -> None:
    from agent.restarts.notices import RestartNotices

    sent: list[dict[str, Any]] = []
    heard: list[str] = []
    notices = RestartNotices(sent.append, "host-1", clock=lambda: 1767225600.7)

    def broken(_: str) -> None:
        raise RuntimeError("a listener's bug")

    notices.listeners.extend([broken, heard.append])
    notices("vm-1")
    assert sent == [{"externalId": "vm-1", "externalStatus": "start", "externalTimestamp": 1767225600,
                     "reportedHostUuid": "host-1"}]
    assert heard == ["vm-1"]


def test_adoption_hands_the_runner_only_the_vms_it_may_act_on() -> None:
    from drivers.libvirt.restart_ops import adoption_causes
    from tests.restart_target import LibvirtTestTarget

    target = LibvirtTestTarget()
    try:
        always, no = {"name": "always"}, {"name": "no"}
        pending = RestartRecord(1, 0.1, time.time(), pending=True)
        vms = {
            "running, pending": target.create(always, pending),
            "running": target.create(always),
            "killed": target.create(always),
            "killed, policy no": target.create(no),
            "killed, pending, policy no": target.create(no, pending),
            "stopped by the controller": target.create(always, RestartRecord.stopped()),
            "no record (an older agent's)": target.create(always, None),
        }
        for name, uuid in vms.items():
            if name != "running" and not name.startswith("running,"):
                target.kill(uuid)
        policies = {uuid: "no" if "policy no" in name else "always" for name, uuid in vms.items()}
        causes = adoption_causes(target.conn, policies)
        assert {name: causes[uuid] for name, uuid in vms.items() if uuid in causes} == {
            "running, pending": None, "killed": "killed", "killed, pending, policy no": "killed"}
    finally:
        target.close()
