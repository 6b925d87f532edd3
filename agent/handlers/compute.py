"""compute.instance.* handlers: thin glue between Cattle's events and the driver."""

from __future__ import annotations

from typing import Any

from agent.dispatcher import HandlerError
from agent.handlers.instance_event import instance_of, instance_uuid, labels_of, placement_of, process_data, stop_timeout
from agent.hostinfo import primary_ip_address
from agent.protocol.events import Event
from agent.spec.cattle import spec_from_cattle_instance
from drivers.base import Hypervisor, NotFound, VmRecord


def instance_reply(record: VmRecord) -> dict[str, Any]:
    """The instanceHostMap reply: externalId plus herdsman's facts under data.fields."""
    fields: dict[str, Any] = {"herdsmanState": record.state, "restartRequired": record.restart_required}
    if record.primary_ip:
        fields["primaryIpAddress"] = record.primary_ip
    fields.update(port_fields(record))
    return {"instance": {"externalId": record.external_id, "+data": {"+fields": fields}}}


def port_fields(record: VmRecord) -> dict[str, Any]:
    """Published ports as Cattle's docker agents reported them: `dockerPorts`
    ('hostIp:hostPort:guestPort/proto', from which Cattle fills its ports' publicPort), with the
    host's address (`dockerHostIp`) and the VM's (`dockerIp`, the ports' private side) when known."""
    fields: dict[str, Any] = {"dockerPorts": list(record.published_ports)}
    if record.published_ports:
        host_ip = primary_ip_address()
        if host_ip:
            fields["dockerHostIp"] = host_ip
        if record.primary_ip:
            fields["dockerIp"] = record.primary_ip
    return fields


class ComputeHandlers:
    def __init__(self, driver: Hypervisor, *, stop_timeout: float) -> None:
        self.driver = driver
        self.default_stop_timeout = stop_timeout

    async def activate(self, event: Event) -> dict[str, Any]:
        instance = instance_of(event)
        spec = spec_from_cattle_instance(instance)
        if not spec.uuid:
            raise HandlerError("data.instanceHostMap.instance.uuid: missing")
        if process_data(event).get("containerNoOpEvent"):
            return instance_reply(await self.driver.get_vm(spec.uuid))
        record = await self.driver.ensure_vm(spec, placement_of(instance), start=spec.start_on_create or _is_start(event))
        return instance_reply(record)

    async def deactivate(self, event: Event) -> dict[str, Any]:
        """Stop the VM. One that is not on this host is stopped already: answered as done, as
        Cattle's own agents do (an error would make the controller retry the stop forever)."""
        uuid = instance_uuid(event)
        timeout = stop_timeout(event, self.default_stop_timeout)
        try:
            if process_data(event).get("containerNoOpEvent"):
                return instance_reply(await self.driver.get_vm(uuid))
            return instance_reply(await self.driver.stop_vm(uuid, timeout))
        except NotFound:
            return {}

    async def restart(self, event: Event) -> dict[str, Any]:
        uuid = instance_uuid(event)
        return instance_reply(await self.driver.restart_vm(uuid, stop_timeout(event, self.default_stop_timeout)))

    async def remove(self, event: Event) -> dict[str, Any]:
        await self.driver.remove_vm(instance_uuid(event), stop_timeout(event, self.default_stop_timeout))
        return {}

    async def purge(self, event: Event) -> dict[str, Any]:
        await self.driver.purge_vm(instance_uuid(event))
        return {}

    async def force_stop(self, event: Event) -> dict[str, Any]:
        data = event.data or {}
        target = data.get("instanceForceStop") or {}
        uuid = target.get("id") if isinstance(target, dict) else None
        if not uuid:
            uuid = instance_uuid(event)
        try:
            await self.driver.force_stop_vm(uuid)
        except NotFound:
            pass  # already gone: that is what force.stop wants
        return {}

    async def inspect(self, event: Event) -> dict[str, Any]:
        data = event.data or {}
        target = data.get("instanceInspect") or {}
        if not isinstance(target, dict):
            raise HandlerError("data.instanceInspect: must be an object")
        uuid = target.get("id") or target.get("name")
        if not isinstance(uuid, str) or not uuid:
            raise HandlerError("data.instanceInspect.id: missing")
        try:
            return await self.driver.inspect_vm(uuid)
        except NotFound:
            return {}  # Cattle's agents answer an empty instanceInspect for what is not there

    async def setlabels(self, event: Event) -> dict[str, Any]:
        record = await self.driver.set_labels(instance_uuid(event), labels_of(event))
        return instance_reply(record)


def _is_start(event: Event) -> bool:
    """instance.start on an existing VM sends activate too; only instance.create honours startOnCreate."""
    context = event.context or {}
    return context.get("topProcessName") in ("instance.start", "instance.restart")
