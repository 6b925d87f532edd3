"""Bad input from the controller: a clear error reply, the agent keeps serving, nothing defined."""

from __future__ import annotations

import asyncio
import json

import libvirt
import pytest

from tests.agent_harness import host_map, instance_event, ping, running_agent, vm_instance

pytestmark = pytest.mark.timeout(120)

INJECTIONS = [
    "</name><devices><disk type='file'><source file='/etc/shadow'/></disk></devices>",
    "'; rm -rf / #",
    "$(reboot)",
    "../../../../etc/passwd",
    "]]><!ENTITY x SYSTEM 'file:///etc/passwd'>",
    "line\nbreak\x00nul\x1b[31m",
]


@pytest.fixture
def test_conn():
    conn = libvirt.open("test:///default")
    yield conn
    conn.close()


def uuids(conn) -> set[str]:
    return {d.UUIDString() for d in conn.listAllDomains(0)}


async def error_of(reply: dict) -> str:
    assert reply.get("transitioning") == "error", reply
    assert reply["transitioningMessage"] and reply["transitioningInternalMessage"]
    return reply["transitioningMessage"]


async def test_malformed_frames_are_answered_or_dropped(tmp_path, test_conn):
    async with running_agent(tmp_path) as (ctl, _):
        before = uuids(test_conn)
        await ctl.send_raw("this is not json")
        await ctl.send_raw("[1, 2, 3]")
        await ctl.send_raw(json.dumps({"id": "x", "replyTo": "reply.1"}))  # no name
        # wrong types, with a replyTo to answer
        bad = {"id": "e1", "name": "compute.instance.activate", "replyTo": "reply.42", "data": "not an object",
               "resourceType": "instanceHostMap", "resourceId": "r1"}
        await ctl.send_raw(json.dumps(bad))
        reply = await ctl.wait_reply(bad, timeout=10)
        assert "data" in await error_of(reply)
        # a 10 MiB frame: refused by size, answered
        huge = ctl.make_event("compute.instance.activate", {"pad": "x" * (10 << 20)},
                              resource_type="instanceHostMap", resource_id="big")
        await ctl.send(huge)
        message = await error_of(await ctl.wait_reply(huge, timeout=20))
        assert "bytes" in message
        # unknown event name
        reply = await ctl.request("compute.instance.frobnicate", {}, resource_type="instanceHostMap", resource_id="r2")
        assert "unknown event" in await error_of(reply)
        # still serving
        assert (await ping(ctl))["data"]["options"]["instances"] is True
        assert uuids(test_conn) == before


async def test_missing_fields_and_invalid_specs(tmp_path, test_conn):
    async with running_agent(tmp_path) as (ctl, _):
        before = uuids(test_conn)
        reply = await ctl.request("compute.instance.activate", {"instanceHostMap": {}},
                                  resource_type="instanceHostMap", resource_id="r1")
        assert "instanceHostMap.instance" in await error_of(reply)
        no_uuid = vm_instance("x")
        del no_uuid["uuid"]
        assert "uuid" in await error_of(await instance_event(ctl, "activate", no_uuid))
        cases = {
            "vcpu": vm_instance("a", vcpu="2"),
            "disks.0.size": vm_instance("b", disks=[{"name": "d", "size": "10q"}]),
            "ports.0": vm_instance("c", ports=["80:70000"]),
            "imageUuid": vm_instance("d", imageUuid="docker:ubuntu"),
            "memoryMb": {**vm_instance("e"), "memoryMb": -5},
            "networkMode": vm_instance("f", networkMode="host"),
        }
        for path, inst in cases.items():
            message = await error_of(await instance_event(ctl, "activate", inst))
            assert message.startswith(path), (path, message)
        reply = await instance_event(ctl, "deactivate", vm_instance("g"), process={"timeout": "soon"})
        assert "processData.timeout" in await error_of(reply)
        assert uuids(test_conn) == before
        assert (await ping(ctl))["data"]["resources"]


async def test_injection_in_every_string_field_is_inert(tmp_path, test_conn):
    async with running_agent(tmp_path) as (ctl, _):
        before = uuids(test_conn)
        # (healthState and version are the controller's own bookkeeping: accepted, never used)
        string_fields = ["hostname", "domainName", "cpuSet", "imageUuid", "volumeDriver", "registryCredentialId",
                         "requestedHostId", "hostId"]
        list_fields = ["dns", "dnsSearch", "extraHosts", "ports", "expose", "securityOpt", "networkIds", "command"]
        for payload in INJECTIONS:
            for field in string_fields:
                reply = await instance_event(ctl, "activate", vm_instance("i", **{field: payload}))
                message = await error_of(reply)
                assert message.startswith(field), (field, message)
            for field in list_fields:
                reply = await instance_event(ctl, "activate", vm_instance("i", **{field: [payload]}))
                assert (await error_of(reply)).startswith(field)
            reply = await instance_event(ctl, "activate", vm_instance("i", disks=[{"name": payload}]))
            assert (await error_of(reply)).startswith("disks.0.name")
            reply = await instance_event(ctl, "activate", vm_instance("i", labels={payload: "v"}))
            assert (await error_of(reply)).startswith("labels")
        assert uuids(test_conn) == before
        # Free text is accepted, and stays data: it cannot add a device or change the name.
        inst = vm_instance(INJECTIONS[0][:200].replace("\n", " "), description=INJECTIONS[0] + INJECTIONS[5],
                           labels={"k": INJECTIONS[0]}, userdata=INJECTIONS[1])
        inst["name"] = INJECTIONS[0]
        reply = await instance_event(ctl, "activate", inst)
        assert reply.get("transitioning") is None, reply.get("transitioningMessage")
        dom = test_conn.lookupByUUIDString(inst["uuid"])
        xml = dom.XMLDesc(0)
        assert "/etc/shadow'/>" not in xml and dom.name() == inst["uuid"]
        assert dom.metadata(libvirt.VIR_DOMAIN_METADATA_TITLE, None) == INJECTIONS[0]
        await instance_event(ctl, "purge", inst)


async def test_libvirt_unavailable_gives_an_error_reply(tmp_path):
    async with running_agent(tmp_path, uri="qemu+unix:///system?socket=/nonexistent/libvirt-sock") as (ctl, _):
        reply = await instance_event(ctl, "activate", vm_instance("u"), timeout=20)
        message = await error_of(reply)
        assert "unavailable" in message and "libvirt" in message
        reply = await ping(ctl)
        assert reply["data"]["resources"], "ping still answers with host facts"
        assert "instances" not in reply["data"]["options"], "no instance list rather than an empty one"
