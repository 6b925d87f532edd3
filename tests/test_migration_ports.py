"""Published ports checked on the destination before a migration: the pure clash rule, and the
destination's VMs read through libvirt (the test driver stands for the destination's libvirtd)."""

from __future__ import annotations

import asyncio
import uuid as uuid_module
from pathlib import Path

import libvirt
import pytest

from drivers.base import DriverError
from drivers.libvirt.domxml.metadata import KEY, NAMESPACE, metadata_xml
from drivers.libvirt.domxml.model import AgentMetadata
from drivers.libvirt.migration.port_check import clash, conflicts, destination_bindings
from drivers.libvirt.migration.service import MigrationService, SourceHost
from drivers.ports.model import PortBinding


def tcp(port: int, host_ip: str = "0.0.0.0", guest: int = 80) -> PortBinding:
    return PortBinding("tcp", host_ip, port, guest)


@pytest.mark.parametrize(("a", "b", "expected"), [
    (tcp(8080), tcp(8080, guest=22), True),  # the host port counts, not the guest's
    (tcp(8080), tcp(8081), False),
    (tcp(8080), PortBinding("udp", "0.0.0.0", 8080, 80), False),
    (tcp(8080, "10.0.0.5"), tcp(8080), True),  # any address covers this one
    (tcp(8080, "10.0.0.5"), tcp(8080, "10.0.0.6"), False),
    (tcp(8080, "10.0.0.5"), tcp(8080, "10.0.0.5"), True),
])
def test_two_bindings_clash_on_the_same_host_port_and_address(a: PortBinding, b: PortBinding, expected: bool) -> None:
    assert clash(a, b) is expected and clash(b, a) is expected


def test_each_blocked_port_is_named_with_the_vm_that_holds_it() -> None:
    theirs = {"vm-b": (tcp(8080), tcp(2222)), "vm-c": (tcp(9090, "10.0.0.6"),)}
    assert conflicts((tcp(8080, "10.0.0.5"), tcp(9090, "10.0.0.5"), tcp(2222)), theirs) == [
        "host port 10.0.0.5:8080/tcp is published there by VM vm-b",
        "host port 0.0.0.0:2222/tcp is published there by VM vm-b",
    ]
    assert conflicts((), theirs) == []


def test_the_destinations_vms_are_read_from_their_metadata_and_the_moving_vm_is_left_out() -> None:
    conn = libvirt.open("test:///default")
    made = []
    try:
        for ports in ((tcp(8080),), (), (tcp(8080),)):
            uuid = str(uuid_module.uuid4())
            dom = conn.defineXML(f"<domain type='test'><name>ports-{uuid[:8]}</name><uuid>{uuid}</uuid>"
                                 "<memory>65536</memory><os><type>hvm</type></os></domain>")
            dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT,
                            metadata_xml(AgentMetadata(instance_uuid=uuid, spec_hash="x", ports=ports)), KEY, NAMESPACE)
            made.append(dom)
        foreign = conn.defineXML("<domain type='test'><name>ports-foreign</name><memory>65536</memory>"
                                 "<os><type>hvm</type></os></domain>")  # not ours: never counted
        made.append(foreign)
        moving = made[2].UUIDString()
        assert destination_bindings(conn, moving) == {made[0].UUIDString(): (tcp(8080),)}
    finally:
        for dom in made:
            dom.undefine()
        conn.close()


async def test_the_service_refuses_a_move_onto_a_port_taken_there_and_says_nothing_moved(tmp_path) -> None:
    """Through the migration service: the source VM and the destination's VMs are test-driver
    domains (the destination a libvirt test node of its own), as the agent would read them."""
    theirs = str(uuid_module.uuid4())
    node = tmp_path / "destination.xml"
    node.write_text(
        f"<node><domain type='test'><name>there</name><uuid>{theirs}</uuid><memory>65536</memory>"
        "<os><type>hvm</type></os><metadata>"
        + metadata_xml(AgentMetadata(instance_uuid=theirs, spec_hash="x", ports=(tcp(2222, guest=22),)))
        .replace("<instance", f"<instance xmlns='{NAMESPACE}'", 1)
        + "</metadata></domain></node>")
    src, dst = libvirt.open("test:///default"), libvirt.open(f"test://{node}")
    uuid = str(uuid_module.uuid4())
    dom = src.defineXML(f"<domain type='test'><name>moving-{uuid[:8]}</name><uuid>{uuid}</uuid>"
                        "<memory>65536</memory><os><type>hvm</type></os></domain>")
    service = MigrationService(SourceHost(connection=lambda: src, lock=lambda _: asyncio.Lock(),
                                          require=lambda _: dom, purge=lambda *_: [], forget=lambda _: None,
                                          state_dir=Path(tmp_path)))
    try:
        await service.check_ports(dom, dst, "qemu+tcp://b/system")  # no ports: nothing to check
        dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT,
                        metadata_xml(AgentMetadata(instance_uuid=uuid, spec_hash="x", ports=(tcp(2222),))), KEY, NAMESPACE)
        with pytest.raises(DriverError) as refused:
            await service.check_ports(dom, dst, "qemu+tcp://b/system")
        assert str(refused.value) == (f"cannot migrate to qemu+tcp://b/system: host port 0.0.0.0:2222/tcp is published "
                                      f"there by VM {theirs}; nothing was moved, the VM still runs on this host")
    finally:
        dom.undefine()
        src.close()
        dst.close()
