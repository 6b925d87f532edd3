"""Requests for an instance that is not on this host, shaped like the ones in Rancher's agents'
test fixtures (python-agent tests/docker/instance_remove, Cattle's force.stop and inspect
payloads; ../shared/docs/cattle-protocol.md §2-3), answered as Cattle's own agents answer them:
a stop, force stop or remove of something absent is done (an error would make the controller
retry the stop forever), an inspect is an empty instanceInspect, and no reply ever carries a raw
libvirt message for a lookup by a name that is not a uuid.
"""

from __future__ import annotations

import uuid

import pytest

from tests.agent_harness import running_agent

pytestmark = pytest.mark.timeout(60)

ABSENT = str(uuid.uuid4())
DOCKER_ID = "bce6ab63b2c4d6f8e0b0c4d5e1f2a3b4c5d6e7f8a9b0c1d2e3f4a5b6c7d8e9f0"  # not a uuid


def host_map(instance_uuid: str, external_id: str | None = None) -> dict:
    """The instanceHostMap of python-agent's captured `instance_remove` request."""
    return {"instanceHostMap": {"id": 3, "state": "removing", "instanceId": 3, "hostId": 1,
                                "instance": {"id": 3, "uuid": instance_uuid, "kind": "virtualMachine",
                                             "state": "purging", "externalId": external_id,
                                             "data": {"fields": {"primaryIpAddress": "10.42.241.115"}}},
                                "host": {"id": 1, "kind": "libvirt", "uuid": str(uuid.uuid4()), "agentId": 1}}}


def assert_done(reply: dict, resource_type: str) -> None:
    assert reply.get("transitioning") in (None, "no"), reply.get("transitioningMessage")
    assert reply["data"] == {resource_type: {}}, reply["data"]
    assert "libvirt" not in str(reply)


@pytest.mark.parametrize("name,extra", [
    ("compute.instance.deactivate", {"processData": {"timeout": 10}}),
    ("compute.instance.remove", {}),
    ("compute.instance.purge", {}),
])
async def test_stop_and_remove_of_an_absent_instance_are_done(tmp_path, name: str, extra: dict) -> None:
    async with running_agent(tmp_path) as (ctl, _agent):
        for instance_uuid in (ABSENT, DOCKER_ID):
            data = {**host_map(instance_uuid, external_id=DOCKER_ID), **extra}
            reply = await ctl.request(name, data, resource_type="instanceHostMap", resource_id="1ihm3",
                                      context={"processName": "instancehostmap.remove",
                                               "topProcessName": "instance.purge"})
            assert_done(reply, "instanceHostMap")


async def test_force_stop_of_an_absent_instance_is_done(tmp_path) -> None:
    async with running_agent(tmp_path) as (ctl, _agent):
        for target in (ABSENT, DOCKER_ID):
            reply = await ctl.request("compute.instance.force.stop",
                                      {"instanceForceStop": {"id": target, "kind": "docker"}})
            assert reply.get("transitioning") in (None, "no"), reply.get("transitioningMessage")
            assert "libvirt" not in str(reply)


async def test_inspect_of_an_absent_instance_is_empty(tmp_path) -> None:
    async with running_agent(tmp_path) as (ctl, _agent):
        for target in ({"id": ABSENT, "kind": "virtualMachine"}, {"name": "sad_bell", "kind": "docker"},
                       {"id": DOCKER_ID, "kind": "docker"}):
            reply = await ctl.request("compute.instance.inspect", {"instanceInspect": target},
                                      resource_type="instanceInspect", resource_id="1ii1")
            assert_done(reply, "instanceInspect")
