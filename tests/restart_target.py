"""The driver side of the restart policy on libvirt's test:///default, for the runner's tests.

It does what the LibvirtDriver will do (phase 2) with the same store (drivers/libvirt/
restart_store.py): the record in each domain's metadata, one lock per VM, compare-and-set
writes, and the controller's own start and stop rewriting the record first. Domains are real
test-driver domains, so starts, stops, state reasons and metadata are libvirt's own.
"""

from __future__ import annotations

import asyncio
import uuid as uuid_module
from collections import defaultdict
from dataclasses import replace

import libvirt

from agent.restarts.record import RestartRecord
from agent.restarts.runner import RestartFacts
from agent.spec.policies import RestartPolicy
from drivers.base import StopCause
from drivers.libvirt.events import shutoff_cause
from drivers.libvirt.restart_store import read_record, write_record

_XML = """<domain type='test'><name>{name}</name><uuid>{uuid}</uuid><memory>65536</memory>
<os><type>hvm</type></os></domain>"""


class LibvirtTestTarget:
    def __init__(self) -> None:
        self.conn = libvirt.open("test:///default")
        self.policies: dict[str, RestartPolicy | None] = {}
        self.locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self.starts: list[str] = []
        self._defined: list[libvirt.virDomain] = []

    def close(self) -> None:
        for dom in self._defined:
            if dom.isActive():
                dom.destroy()
            dom.undefine()
        self.conn.close()

    # -- set-up, and what the controller and the outside world do ---------------------------

    def create(self, policy: dict[str, object] | None, record: RestartRecord | None = RestartRecord()) -> str:
        uuid = str(uuid_module.uuid4())
        dom = self.conn.defineXML(_XML.format(name=f"restart-{uuid[:8]}", uuid=uuid))
        self._defined.append(dom)
        dom.create()
        if record is not None:
            write_record(dom, record)
        self.policies[uuid] = None if policy is None else RestartPolicy.model_validate(policy)
        return uuid

    def dom(self, uuid: str) -> libvirt.virDomain:
        return self.conn.lookupByUUIDString(uuid)

    def kill(self, uuid: str) -> StopCause:
        """`virsh destroy` from outside; the cause libvirt now gives for the shut-off domain."""
        dom = self.dom(uuid)
        dom.destroy()
        cause = shutoff_cause(dom.state()[1])
        assert cause is not None
        return cause

    async def controller_stop(self, uuid: str) -> None:
        async with self.locks[uuid]:
            dom = self.dom(uuid)
            write_record(dom, RestartRecord.stopped())
            if dom.isActive():
                dom.destroy()

    async def controller_start(self, uuid: str) -> None:
        async with self.locks[uuid]:
            dom = self.dom(uuid)
            write_record(dom, RestartRecord.started_by_controller())
            if not dom.isActive():
                dom.create()

    def record(self, uuid: str) -> RestartRecord | None:
        return read_record(self.dom(uuid))

    def running(self, uuid: str) -> bool:
        return bool(self.dom(uuid).isActive())

    # -- RestartTarget ------------------------------------------------------------------------

    async def restart_facts(self, instance_uuid: str) -> RestartFacts:
        async with self.locks[instance_uuid]:
            dom = self.dom(instance_uuid)
            return RestartFacts(self.policies[instance_uuid], read_record(dom), bool(dom.isActive()))

    async def replace_restart_record(self, instance_uuid: str, expected: RestartRecord, record: RestartRecord) -> bool:
        async with self.locks[instance_uuid]:
            dom = self.dom(instance_uuid)
            if read_record(dom) != expected:
                return False
            write_record(dom, record)
            return True

    async def start_for_policy(self, instance_uuid: str, expected: RestartRecord) -> bool:
        async with self.locks[instance_uuid]:
            dom = self.dom(instance_uuid)
            if dom.isActive() or read_record(dom) != expected:
                return False
            dom.create()
            write_record(dom, replace(expected, pending=False))
            self.starts.append(instance_uuid)
            return True
