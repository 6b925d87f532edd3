"""When the table is rewritten (drivers.libvirt.port_sync), on the real libvirtd and nftables (root).

A libvirt network of the test's own stands in for the managed network (the shared `default`
network is never restarted); its bridge is where route_localnet must be on for a VM published on
127.0.0.1. The VM itself is a registry entry with an address: what is under test is when and
what the sync writes, not the guest (tests/test_ports_agent.py boots one).
"""

from __future__ import annotations

import asyncio
import logging
import random
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import libvirt
import pytest
import pytest_asyncio

from drivers.libvirt import threads
from drivers.libvirt.domxml.model import AgentMetadata
from drivers.libvirt.port_sync import PortSync
from drivers.ports import localnet
from drivers.ports.model import PortBinding
from drivers.ports.publisher import PortPublisher
from drivers.ports.ruleset import TableConfig
from tests.libvirtd_fixtures import SYSTEM_URI, system_connection
from tests.ports_fixtures import drop_table, forward_chain, needs_root_nft, nft_json, published, table_text
from tests.unix_proxy import UnixProxy

pytestmark = [pytest.mark.libvirtd, pytest.mark.timeout(120)]

VM = str(uuid.uuid4())


@dataclass
class Addresses:
    """The address book's answers for the stand-in VM."""

    known: dict[str, str]

    def get(self, uuid_: str) -> str | None:
        return self.known.get(uuid_)

    def refresh(self, dom: libvirt.virDomain) -> str | None:
        return self.known.get(dom.UUIDString())


@dataclass
class Network:
    conn: libvirt.virConnect
    name: str
    bridge: str
    xml: str
    guest: str  # an address on it for the stand-in VM

    def restart(self) -> None:
        """What `virsh net-destroy` + `net-start` does: the bridge is made anew."""
        self.conn.networkLookupByName(self.name).destroy()
        self.conn.networkCreateXML(self.xml)


@pytest_asyncio.fixture
async def network() -> AsyncIterator[Network]:
    needs_root_nft()
    system_connection().close()
    threads.start_event_thread()  # before the connection whose events we want
    conn = libvirt.open(SYSTEM_URI)
    token = uuid.uuid4().hex[:8]
    subnet = f"100.126.{random.randint(0, 255)}"
    name, bridge = f"hmt-{token}", f"hmtb{token[:6]}"
    xml = (f"<network><name>{name}</name><bridge name='{bridge}'/>"
           f"<ip address='{subnet}.1' netmask='255.255.255.0'/></network>")
    conn.networkCreateXML(xml)  # transient: gone when destroyed
    try:
        yield Network(conn, name, bridge, xml, f"{subnet}.5")
    finally:
        try:
            conn.networkLookupByName(name).destroy()
        except libvirt.libvirtError:
            pass
        conn.close()


@pytest_asyncio.fixture
async def table() -> AsyncIterator[TableConfig]:
    config = TableConfig(name=f"hmt_{uuid.uuid4().hex[:8]}")
    yield config
    drop_table(config.name)


def running_vm(port: int) -> dict[str, AgentMetadata]:
    return {VM: AgentMetadata(instance_uuid=VM, spec_hash="", ports=(PortBinding("tcp", "0.0.0.0", port, 80),))}


async def started(net: Network, table: TableConfig, conn: libvirt.virConnect | None = None, **timing: float) -> PortSync:
    sync = PortSync(PortPublisher(table=table), network=net.name, logger=logging.getLogger("test.ports"), **timing)
    registry = running_vm(random.randint(41000, 41999))
    sync.start(registry=lambda: registry, state=lambda _uuid: "running", addresses=Addresses({VM: net.guest}))
    sync.connected(conn or net.conn)
    await until(lambda: sync.count >= 1)
    return sync


async def until(probe: Callable[[], object], timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not probe():
        assert time.monotonic() < deadline, "never happened"
        await asyncio.sleep(0.05)


async def test_the_first_sync_forwards_the_vm_and_a_burst_of_requests_is_one_sync(network: Network,
                                                                                     table: TableConfig) -> None:
    sync = await started(network, table)
    try:
        [(key, (address, guest_port, _))] = published(nft_json("table", "ip", table.name)).items()
        assert (address, guest_port) == (network.guest, 80)
        assert localnet.route_localnet(network.bridge) is True  # 0.0.0.0 covers 127.0.0.1
        before = sync.count
        for _ in range(100):
            sync.request()
        await until(lambda: sync.count > before)
        await asyncio.sleep(0.5)  # long enough for a second sync, were one coming
        assert sync.count == before + 1
    finally:
        await sync.close()


async def test_a_restarted_network_gets_route_localnet_back(network: Network, table: TableConfig) -> None:
    sync = await started(network, table)  # repairs once a minute: only the network's event can be quick
    try:
        before = sync.count
        await asyncio.to_thread(network.restart)
        await until(lambda: sync.count > before and localnet.route_localnet(network.bridge) is True)
    finally:
        await sync.close()


async def test_after_a_reconnect_the_new_connection_brings_the_events(network: Network, table: TableConfig,
                                                                      tmp_path) -> None:
    proxy = UnixProxy(tmp_path / "libvirt-sock")
    proxy.listen()
    uri = f"qemu+unix:///system?socket={proxy.path}"
    first = libvirt.open(uri)
    sync = await started(network, table, first)
    second = None
    try:
        proxy.cut()  # libvirtd gone for this client: EOF on the first connection
        proxy.listen()
        second = libvirt.open(uri)
        before = sync.count
        sync.connected(second)  # what the driver does after adopting again
        await until(lambda: sync.count > before)
        before = sync.count
        await asyncio.to_thread(network.restart)
        await until(lambda: sync.count > before and localnet.route_localnet(network.bridge) is True)
    finally:
        await sync.close()
        if second is not None:
            second.close()
        proxy.stop()


async def test_what_others_flush_is_repaired_and_closing_clears_nothing(network: Network, table: TableConfig) -> None:
    sync = await started(network, table, repair_every=0.3)
    rules = table_text(table.name)
    comment = f"{table.name}-published-ports"
    try:
        subprocess.run(["nft", "delete", "table", "ip", table.name], check=True)
        subprocess.run(["iptables", "-w", "-D", "FORWARD", *forward_chain()[0].split()[2:]], check=True)
        assert not any(comment in line for line in forward_chain())
        await until(lambda: table_text(table.name) == rules and comment in forward_chain()[0])
    finally:
        await sync.close()
    assert table_text(table.name) == rules, "the agent going away leaves the rules serving the VMs"
    assert comment in forward_chain()[0]
