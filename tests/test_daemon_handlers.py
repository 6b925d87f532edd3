"""Every handler through the real agent (websocket + /publish) on libvirt's test driver."""

from __future__ import annotations

import asyncio
import json

import libvirt
import pytest

from tests.agent_harness import instance_event, ping, ping_instances, running_agent, vm_instance

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def test_conn():
    conn = libvirt.open("test:///default")  # the same in-process state the agent's driver sees
    yield conn
    conn.close()


def domain_uuids(conn) -> set[str]:
    return {d.UUIDString() for d in conn.listAllDomains(0)}


def assert_reply_layout(reply: dict, request_name: str, resource_type: str) -> None:
    assert reply["name"].startswith("reply.")
    assert reply["previousNames"] == [request_name]
    assert reply["resourceType"] == resource_type
    assert reply.get("transitioning") in (None, "no"), reply


async def test_ping_reports_host_and_instances(tmp_path):
    async with running_agent(tmp_path) as (ctl, agent):
        reply = await ping(ctl)
        assert_reply_layout(reply, "ping", "agent")
        resources = reply["data"]["resources"]
        kinds = {r["type"] for r in resources}
        assert {"physicalHost", "host", "storagePool", "hostUuid"} <= kinds
        host = next(r for r in resources if r["type"] == "host")
        assert host["uuid"] == agent.host_uuid
        assert host["info"]["cpuInfo"]["count"] >= 1
        assert host["info"]["hypervisorInfo"]["libvirtVersion"]
        assert reply["data"]["options"] == {"instances": True}
        assert all("type" in r and "uuid" in r for r in resources)
        # without options.instances: no instance list, and options say so
        light = await ping(ctl, instances=False)
        assert not any(r["type"] in ("instance", "hostUuid") for r in light["data"]["resources"])


async def test_activate_deactivate_restart_remove_purge(tmp_path, test_conn):
    async with running_agent(tmp_path) as (ctl, agent):
        inst = vm_instance("web", labels={"tier": "front"}, disks=[{"name": "data", "size": "1g"}])
        uuid = inst["uuid"]
        reply = await instance_event(ctl, "activate", inst)
        assert_reply_layout(reply, "compute.instance.activate", "instanceHostMap")
        assert reply["previousIds"] == [ctl.replies[-1]["previousIds"][0]]
        body = reply["data"]["instanceHostMap"]["instance"]
        assert body["externalId"] == uuid
        assert body["+data"]["+fields"]["herdsmanState"] == "running"
        dom = test_conn.lookupByUUIDString(uuid)
        assert dom.isActive()
        assert ping_instances(await ping(ctl))[uuid]["state"] == "running"
        assert ping_instances(await ping(ctl))[uuid]["labels"] == {"tier": "front"}

        reply = await instance_event(ctl, "deactivate", inst, timeout=30, process={"timeout": 1})
        assert reply["data"]["instanceHostMap"]["instance"]["+data"]["+fields"]["herdsmanState"] == "stopped"
        assert not dom.isActive()
        assert ping_instances(await ping(ctl))[uuid]["state"] == "stopped"

        reply = await instance_event(ctl, "activate", inst)
        assert dom.isActive()
        reply = await instance_event(ctl, "restart", inst, process={"timeout": 0})
        assert reply["data"]["instanceHostMap"]["instance"]["+data"]["+fields"]["herdsmanState"] == "running"

        volumes = [v.name() for v in test_conn.storagePoolLookupByName("herdsman").listAllVolumes(0)]
        assert f"{uuid}-data.qcow2" in volumes
        reply = await instance_event(ctl, "remove", inst, process={"timeout": 0})
        assert reply["data"] == {"instanceHostMap": {}}
        assert uuid not in domain_uuids(test_conn)
        assert uuid not in ping_instances(await ping(ctl))
        pool = test_conn.storagePoolLookupByName("herdsman")
        assert f"{uuid}-data.qcow2" in [v.name() for v in pool.listAllVolumes(0)], "remove keeps volumes"
        seed = tmp_path / "state" / "seeds" / f"{uuid}.iso"
        assert seed.exists()

        await instance_event(ctl, "purge", inst)
        assert f"{uuid}-data.qcow2" not in [v.name() for v in pool.listAllVolumes(0)]
        assert not seed.exists()
        # every step again: each is idempotent
        assert (await instance_event(ctl, "remove", inst))["data"] == {"instanceHostMap": {}}
        assert (await instance_event(ctl, "purge", inst))["data"] == {"instanceHostMap": {}}


async def test_start_on_create_false_defines_without_starting(tmp_path, test_conn):
    async with running_agent(tmp_path) as (ctl, _):
        inst = vm_instance("cold", startOnCreate=False)
        reply = await instance_event(ctl, "activate", inst)
        assert reply["data"]["instanceHostMap"]["instance"]["+data"]["+fields"]["herdsmanState"] == "stopped"
        assert not test_conn.lookupByUUIDString(inst["uuid"]).isActive()
        await instance_event(ctl, "purge", inst)


async def test_inspect_setlabels_force_stop(tmp_path, test_conn):
    async with running_agent(tmp_path) as (ctl, _):
        inst = vm_instance("insp")
        uuid = inst["uuid"]
        await instance_event(ctl, "activate", inst)
        reply = await ctl.request("compute.instance.inspect", {"instanceInspect": {"id": uuid, "kind": "virtualMachine"}},
                                  resource_type="instanceInspect", resource_id="ii1")
        data = reply["data"]["instanceInspect"]
        assert data["state"] == "running" and uuid in data["xml"]

        reply = await ctl.request("compute.instance.setlabels",
                                  {"instanceHostMap": {"instance": inst}, "processData": {"labels": {"a.b/c": "<x>&\"y\""}}},
                                  resource_type="instanceHostMap", resource_id="ihm-l")
        assert reply.get("transitioning") is None, reply.get("transitioningMessage")
        assert ping_instances(await ping(ctl))[uuid]["labels"] == {"a.b/c": "<x>&\"y\""}
        assert test_conn.lookupByUUIDString(uuid).isActive(), "setlabels changes metadata live, no restart"

        await ctl.send(ctl.make_event("compute.instance.force.stop", {"instanceForceStop": {"id": uuid, "kind": "virtualMachine"}}))
        for _ in range(50):
            if not test_conn.lookupByUUIDString(uuid).isActive():
                break
            await asyncio.sleep(0.1)
        assert not test_conn.lookupByUUIDString(uuid).isActive()
        await instance_event(ctl, "purge", inst)


async def test_changed_spec_is_redefined(tmp_path, test_conn):
    async with running_agent(tmp_path) as (ctl, _):
        inst = vm_instance("grow", memory_mb=32)
        await instance_event(ctl, "activate", inst)
        await instance_event(ctl, "deactivate", inst, process={"timeout": 0})
        bigger = {**inst, "memoryMb": 64}
        await instance_event(ctl, "activate", bigger)
        dom = test_conn.lookupByUUIDString(inst["uuid"])
        assert dom.maxMemory() == 64 * 1024
        # running + changed: redefined for the next cold start, reported as such
        reply = await instance_event(ctl, "activate", {**inst, "memoryMb": 48})
        assert reply["data"]["instanceHostMap"]["instance"]["+data"]["+fields"]["restartRequired"] is True
        await instance_event(ctl, "purge", inst)


async def test_same_activate_ten_times_at_once(tmp_path, test_conn):
    async with running_agent(tmp_path) as (ctl, _):
        inst = vm_instance("dup")
        event = ctl.make_event("compute.instance.activate", {"instanceHostMap": {"instance": inst}},
                               resource_type="instanceHostMap", resource_id="ihm-dup")
        before = domain_uuids(test_conn)
        for _ in range(10):
            await ctl.send(dict(event))
        replies = [r for r in [await ctl.wait_reply(event, timeout=30)]]
        await asyncio.sleep(0.5)
        replies = [r for r in ctl.replies if r["previousIds"][0] == event["id"]]
        assert len(replies) == 10
        bodies = {json.dumps(r["data"], sort_keys=True) for r in replies}
        assert len(bodies) == 1, bodies
        assert domain_uuids(test_conn) - before == {inst["uuid"]}
        # ten activates with different ids, at once: still one domain, ten consistent replies
        events = [ctl.make_event("compute.instance.activate", {"instanceHostMap": {"instance": inst}},
                                 resource_type="instanceHostMap", resource_id="ihm-dup") for _ in range(10)]
        await asyncio.gather(*(ctl.send(e) for e in events))
        replies = await asyncio.gather(*(ctl.wait_reply(e, timeout=30) for e in events))
        assert {r["data"]["instanceHostMap"]["instance"]["externalId"] for r in replies} == {inst["uuid"]}
        assert all(r.get("transitioning") is None for r in replies)
        assert domain_uuids(test_conn) - before == {inst["uuid"]}
        await instance_event(ctl, "purge", inst)


async def test_host_side_stop_is_reported_at_once(tmp_path, test_conn):
    async with running_agent(tmp_path) as (ctl, agent):
        inst = vm_instance("outside")
        await instance_event(ctl, "activate", inst)
        test_conn.lookupByUUIDString(inst["uuid"]).destroy()  # someone used virsh
        event = await ctl.wait_container_event(lambda e: e["externalId"] == inst["uuid"] and e["externalStatus"] == "die", timeout=2)
        assert event["reportedHostUuid"] == agent.host_uuid
        assert isinstance(event["externalTimestamp"], int)
        assert ping_instances(await ping(ctl))[inst["uuid"]]["state"] == "stopped"
        await instance_event(ctl, "purge", inst)


async def test_controller_restart_reconnects(tmp_path):
    async with running_agent(tmp_path) as (ctl, _):
        await ctl.restart(down_for=1.0)
        await ctl.wait_subscribed(timeout=30, count=2)
        reply = await ping(ctl)
        assert reply["data"]["options"]["instances"] is True
