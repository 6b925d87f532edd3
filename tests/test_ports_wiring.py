"""Published ports in the agent, the parts that need no libvirtd: where ports are published, the
allocation two activates share, what qemu:///session forwards, what Cattle gets, the settings."""

from __future__ import annotations

import argparse
import asyncio
import logging
import socket
import uuid

import pytest

from agent.config import ConfigError, add_arguments, load_config
from agent.handlers.compute import instance_reply
from agent.hostinfo import primary_ip_address
from agent.spec.cattle import spec_from_document
from drivers.base import DriverError, VmRecord
from drivers.libvirt.domxml.model import AgentMetadata
from drivers.libvirt.published_ports import PublishedPorts, port_publisher, publishes_ports, session_bindings
from drivers.ports.model import PortBinding, PortRange
from drivers.ports.publisher import PortPublisher

A, B, C = (str(uuid.UUID(int=i)) for i in (1, 2, 3))


@pytest.mark.parametrize(("uri", "publishes"), [
    ("qemu:///system", True), ("qemu+unix:///system", True),
    ("qemu:///session", False), ("qemu+ssh://kvm-7/system", False), ("qemu+tcp://10.0.0.7/system", False),
    ("test:///default", False),
])
def test_only_a_local_system_libvirt_publishes_with_nftables(uri: str, publishes: bool) -> None:
    assert publishes_ports(uri) is publishes
    publisher = port_publisher(uri, port_range="30000-30009", table="hm_test")
    assert (publisher is not None) is publishes
    if publisher is not None:
        assert (publisher.port_range, publisher.table.name) == (PortRange(30000, 30009), "hm_test")


def spec(*ports: str, uuid_: str = A, **fields: object):
    return spec_from_document({"uuid": uuid_, "ports": list(ports), **fields})


def test_session_mode_reports_what_qemu_forwards() -> None:
    got = session_bindings(spec("8080:80", "53/udp", "0.0.0.0:2222:22"))
    assert [b.docker_port() for b in got] == ["127.0.0.1:8080:80/tcp", "127.0.0.1:53:53/udp", "0.0.0.0:2222:22/tcp"]
    assert session_bindings(spec("8080:80", networkMode="none")) == ()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        return s.getsockname()[1]


def one_port_ports() -> tuple[PublishedPorts, int]:
    port = free_port()
    publisher = PortPublisher(port_range=PortRange(port, port))
    return PublishedPorts(publisher, network="default", logger=logging.getLogger("test")), port


async def test_two_activates_at_once_never_get_one_port() -> None:
    ports, port = one_port_ports()
    registry: dict[str, AgentMetadata] = {}

    async def activate(vm: str) -> tuple[PortBinding, ...]:
        async with ports.allocating(vm):
            bindings = await ports.allocate(spec("80", uuid_=vm), registry, session=False)
            await asyncio.sleep(0.05)  # the rest of an activate: the other one runs meanwhile
            registry[vm] = AgentMetadata(instance_uuid=vm, spec_hash="", ports=bindings)
            return bindings

    results = await asyncio.gather(activate(A), activate(B), return_exceptions=True)
    won = [r for r in results if not isinstance(r, BaseException)]
    lost = [r for r in results if isinstance(r, BaseException)]
    assert [b.docker_port() for b in won[0]] == [f"0.0.0.0:{port}:80/tcp"]
    assert len(lost) == 1 and isinstance(lost[0], DriverError)
    assert str(lost[0]) == f"ports.0: no free host port for 0.0.0.0/tcp in the range {port}-{port}"


async def test_a_failed_activate_frees_its_port_and_a_repeated_one_keeps_it() -> None:
    ports, port = one_port_ports()
    registry: dict[str, AgentMetadata] = {}
    with pytest.raises(RuntimeError):
        async with ports.allocating(A):
            await ports.allocate(spec("80", uuid_=A), registry, session=False)
            raise RuntimeError("the define failed")  # nothing reached the registry
    async with ports.allocating(B):
        first = await ports.allocate(spec("80", uuid_=B), registry, session=False)
        registry[B] = AgentMetadata(instance_uuid=B, spec_hash="", ports=first)
    async with ports.allocating(B):  # Cattle sends the activate again
        assert await ports.allocate(spec("80", uuid_=B), registry, session=False) == first
    with pytest.raises(DriverError, match="no free host port"):
        async with ports.allocating(C):
            await ports.allocate(spec("80", uuid_=C), registry, session=False)


async def test_without_a_publisher_ports_are_stored_only_and_never_refused() -> None:
    ports = PublishedPorts(None, network="default", logger=logging.getLogger("test"))
    assert not ports.enabled
    assert await ports.allocate(spec("80", networkMode="bridge"), {}, session=False) == ()
    assert [b.docker_port() for b in await ports.allocate(spec("8080:80"), {}, session=True)] == ["127.0.0.1:8080:80/tcp"]


def test_the_reply_carries_ports_as_cattle_docker_agents_reported_them() -> None:
    record = VmRecord(instance_uuid=A, external_id=A, state="running", primary_ip="192.168.122.7",
                      published_ports=("0.0.0.0:20001:80/tcp", "127.0.0.1:20002:22/tcp"))
    fields = instance_reply(record)["instance"]["+data"]["+fields"]
    assert fields["dockerPorts"] == ["0.0.0.0:20001:80/tcp", "127.0.0.1:20002:22/tcp"]
    assert fields["dockerIp"] == "192.168.122.7"
    assert fields.get("dockerHostIp") == primary_ip_address()
    bare = instance_reply(VmRecord(instance_uuid=A, external_id=A, state="stopped"))["instance"]["+data"]["+fields"]
    assert bare["dockerPorts"] == [] and "dockerIp" not in bare and "dockerHostIp" not in bare


def parse(*argv: str):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return load_config(parser.parse_args(list(argv)), environ={})


def test_port_settings() -> None:
    config = parse()
    assert (config.port_range, config.ports_table) == ("20000-29999", "herdsman")
    assert parse("--port-range", " 30000-30099 ").port_range == "30000-30099"
    with pytest.raises(ConfigError, match="--port-range / HERDSMAN_PORT_RANGE: .*port range 30099-30000 runs backwards"):
        parse("--port-range", "30099-30000")
    with pytest.raises(ConfigError, match="--port-range / HERDSMAN_PORT_RANGE: .*'80,81' is not a port range"):
        parse("--port-range", "80,81")
    with pytest.raises(ConfigError, match="--ports-table / HERDSMAN_PORTS_TABLE: .*not a table name"):
        parse("--ports-table", "filter; flush ruleset")
