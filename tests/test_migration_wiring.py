"""The pieces that wire migration into the agent, without libvirt: the processData model, the
dispatcher's non-serial routes, which lifecycle events are a migration's own (presence), and
the destination definition for volume disks (destxml). The real thing runs in
tests/test_migration_agents.py."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from agent.dispatcher import Dispatcher, Route
from agent.protocol.events import Event
from agent.spec.errors import SpecError
from agent.spec.migration import parse_migrate
from drivers.libvirt.events import LifecycleEvent
from drivers.libvirt.migration.destxml import with_file_disks
from drivers.libvirt.migration.disks import log_folders
from drivers.libvirt.migration.presence import Presence


def errors(process: Any) -> list[str]:
    with pytest.raises(SpecError) as caught:
        parse_migrate(process)
    return [str(e) for e in caught.value.errors]


def test_destination_forms_and_their_defaults() -> None:
    by_host = parse_migrate({"destination": {"host": "node-2.example.com"}}).destination
    assert (by_host.uri, by_host.migration_address, by_host.migration_port) == (
        "qemu+tcp://node-2.example.com/system", "node-2.example.com", None)
    by_uri = parse_migrate({"destination": {"libvirtUri": "qemu+tls://10.0.0.2/system",
                                            "migrationUri": "tcp://192.168.9.2:49200"}}).destination
    assert (by_uri.uri, by_uri.migration_address, by_uri.migration_port) == (
        "qemu+tls://10.0.0.2/system", "192.168.9.2", 49200)
    assert parse_migrate({"destination": {"libvirtUri": "qemu+tcp://[fd00::2]/system"}}).destination.migration_address == "fd00::2"
    options = parse_migrate({"destination": {"host": "b"}, "options": {"bandwidth": 100, "postcopy": True}}).options
    assert (options.bandwidth, options.postcopy, options.progress_timeout) == (100, True, None)


def test_each_bad_field_is_named() -> None:
    assert errors(None) == ["processData.destination: Field required"]
    assert errors({"destination": {}}) == [
        "processData.destination.libvirtUri: missing: give the destination's libvirtUri (qemu+tcp://HOST/system) "
        "or its host name or address in host"]
    assert errors({"destination": {"libvirtUri": "qemu:///system"}}) == [
        "processData.destination.migrationUri: missing: the libvirtUri names no host to send the VM's memory to"]
    found = errors({"destination": {"libvirtUri": "qemu+tcp://b/system?x=1'", "host": "-bad-", "hostUuid": "7",
                                    "migrationUri": "http://b"},
                    "options": {"bandwidth": "10", "progressTimeout": 0, "completionTimeout": -1, "speed": 1}})
    assert [e.split(":")[0] for e in found] == [
        "processData.destination.hostUuid", "processData.destination.host", "processData.destination.libvirtUri",
        "processData.destination.migrationUri", "processData.options.bandwidth",
        "processData.options.progressTimeout", "processData.options.completionTimeout", "processData.options.speed"]
    assert errors({"destination": {"libvirtUri": "qemu+tcp://b/session"}})[0].endswith(
        "does not name qemu's system driver (path /system)")


async def test_non_serial_routes_run_beside_a_running_event_on_the_same_resource() -> None:
    """A cancel reaches a migration still running on the same instance; a serial event waits."""
    replies: list[dict[str, Any]] = []
    release = asyncio.Event()
    order: list[str] = []

    async def migrate(event: Event) -> dict[str, Any]:
        order.append("migrate")
        await release.wait()
        return {}

    async def cancel(event: Event) -> dict[str, Any]:
        order.append("cancel")
        release.set()
        return {}

    async def stop(event: Event) -> dict[str, Any]:
        order.append("stop")
        return {}

    async def publish(reply: dict[str, Any]) -> None:
        replies.append(reply)

    dispatcher = Dispatcher({"compute.instance.migrate": Route(migrate, serial=False),
                             "compute.instance.migrate.cancel": Route(cancel, serial=False),
                             "compute.instance.deactivate": Route(stop)}, publish)

    def event(name: str) -> str:
        return ('{"id": "%s", "name": "compute.instance.%s", "replyTo": "reply.1", "resourceType": '
                '"instanceHostMap", "resourceId": "7", "data": {}}' % (name, name))

    await dispatcher.on_frame(event("migrate"))
    await asyncio.sleep(0.05)
    await dispatcher.on_frame(event("migrate.cancel"))
    await asyncio.wait_for(dispatcher.drain(), 5)
    assert order == ["migrate", "cancel"] and len(replies) == 2


def ev(uuid: str, event: str, detail: str, status: Any = None) -> LifecycleEvent:
    return LifecycleEvent(uuid=uuid, name=uuid, event=event, detail=detail, status=status, timestamp=0.0)


def test_an_incoming_vm_is_hidden_until_it_runs_here_and_dropped_if_it_never_does() -> None:
    p = Presence()
    assert p.on_event(ev("in", "started", "migrated", "start")) == "quiet"
    assert p.hidden("in")
    assert p.on_event(ev("in", "resumed", "migrated")) == "quiet"
    assert not p.hidden("in")
    assert p.on_event(ev("in", "stopped", "shutdown", "stop")) == "report"  # now an ordinary VM of ours

    assert p.on_event(ev("failed", "started", "migrated", "start")) == "quiet"
    assert p.on_event(ev("failed", "stopped", "failed", "die")) == "drop"
    assert not p.hidden("failed")


def test_a_vm_that_moved_out_is_hidden_and_its_undefine_is_not_a_destroy() -> None:
    p = Presence()
    p.start_out("out")
    assert p.on_event(ev("out", "suspended", "migrated")) == "quiet"
    assert not p.hidden("out")  # still here until it stopped here
    assert p.on_event(ev("out", "stopped", "migrated")) == "quiet"
    assert p.hidden("out")
    p.end_out("out", moved=True)
    assert p.on_event(ev("out", "undefined", "removed", "destroy")) == "quiet"
    assert p.hidden("out")

    p.start_out("stays")  # a failed migration: everything about it is ordinary again
    p.end_out("stays", moved=False)
    assert not p.hidden("stays")
    assert p.on_event(ev("stays", "undefined", "removed", "destroy")) == "report"
    assert p.on_event(ev("other", "stopped", "destroyed", "die")) == "report"
    # moved by someone else (`herdsman migrate` beside the daemon, virsh): the same
    assert p.on_event(ev("by-cli", "stopped", "migrated")) == "quiet" and p.hidden("by-cli")
    assert p.on_event(ev("by-cli", "undefined", "removed", "destroy")) == "quiet"


def test_volume_disks_become_files_in_the_destination_definition_only() -> None:
    xml = ("<domain><devices>"
           "<disk type='volume' device='disk'><source pool='herdsman' volume='u-data.raw'/><target dev='vda'/></disk>"
           "<disk type='volume' device='disk'><source pool='other' volume='x'/><target dev='vdb'/></disk>"
           "<disk type='file' device='cdrom'><source file='/s/seed.iso'/><target dev='hdc'/><readonly/></disk>"
           "<serial type='pty'><log file='/var/log/herdsman/console/u.log' append='on'/></serial>"
           "</devices></domain>")
    out = with_file_disks(xml, {"vda": "/var/lib/herdsman/pool/u-data.raw"})
    assert "<disk type=\"file\" device=\"disk\"><source file=\"/var/lib/herdsman/pool/u-data.raw\"/>" in out
    assert "<source pool=\"other\" volume=\"x\"/>" in out and "/s/seed.iso" in out
    assert log_folders(xml) == ["/var/log/herdsman/console"]
