"""Published ports through the agent: `herdsman run` as a real process on qemu:///system, the
controller double sending Cattle's events, busybox httpd in the real test guest.

One guest for the module (booting is the slow part). What a user checks: the activate reply's
`dockerPorts`, the page fetched through the host port (from this host, from another host, from
another guest through the host's address), refusals that name the field and leave nothing
behind, rules that outlive a SIGKILLed agent untouched, and a purge that leaves no rule and
no other table changed. The agent works in a table of its own (HERDSMAN_PORTS_TABLE).
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import libvirt
import pytest
import pytest_asyncio

from drivers.ports import localnet
from tests.agent_harness import AgentProcess, instance_event, ping, ping_instances, vm_instance
from tests.controller_double import ControllerDouble
from tests.libvirtd_fixtures import SYSTEM_URI, cleanup_test_host, new_test_root, system_connection
from tests.ports_fixtures import (
    drop_table,
    fetch,
    foreign_ruleset,
    forward_chain,
    host_address,
    needs_root_nft,
    neighbour,
    nft_json,
    published,
    refused,
    table_text,
)
from tests.test_e2e_guest import guest_manifest, wait_for

pytestmark = [pytest.mark.libvirtd, pytest.mark.guest, pytest.mark.timeout(900),
              pytest.mark.asyncio(loop_scope="module")]

#: the range the agent chooses from: a few ports, so choices are easy to check
RANGE = (18600, 18639)

USERDATA = """#!/bin/sh
mkdir -p /www && echo HELLO-PUBLISHED > /www/index.html && busybox httpd -p 80 -h /www
echo HTTPD-STARTED
"""

#: a second guest asks the host's addresses for the first guest's page (busybox wget crashes in
#: this static build, so a plain HTTP request through nc)
CLIENT = """#!/bin/sh
( for target in {gateway} {host}; do
    for i in $(seq 1 60); do
      printf 'GET / HTTP/1.0\\r\\n\\r\\n' | timeout 5 nc $target {port} > /tmp/page 2>/dev/null
      if grep -q HELLO-PUBLISHED /tmp/page; then echo "HAIRPIN-$target-$(tail -n 1 /tmp/page)"; break; fi
      sleep 1
    done
  done ) &
echo CLIENT-STARTED
"""


@dataclass
class Host:
    ctl: ControllerDouble
    agent: AgentProcess
    table: str
    dirs: dict[str, Any]
    image: str
    bridge: str
    gateway: str
    others_before: list[dict[str, Any]]
    forward_before: list[str]
    guest: dict[str, Any] = field(default_factory=dict)
    reply: dict[str, Any] = field(default_factory=dict)
    subscriptions: int = 1

    @property
    def log_dir(self) -> Path:
        return Path(self.dirs["log_dir"])

    def console(self, instance: dict[str, Any]) -> Path:
        return self.log_dir / "console" / f"{instance['uuid']}.log"

    async def restart_agent(self, sig: int) -> None:
        self.agent.kill(sig)
        self.agent.start()
        self.subscriptions += 1
        await self.ctl.wait_subscribed(timeout=60, count=self.subscriptions)


def fields_of(reply: dict[str, Any]) -> dict[str, Any]:
    assert reply.get("transitioning") is None, reply.get("transitioningMessage")
    return reply["data"]["instanceHostMap"]["instance"]["+data"]["+fields"]


def error_of(reply: dict[str, Any]) -> str:
    assert reply.get("transitioning") == "error", reply
    return reply["transitioningMessage"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        return s.getsockname()[1]


def port_of(docker_port: str) -> int:
    return int(docker_port.split(":")[1])


async def forwarded_to(table: str, vm_uuid: str, timeout: float = 90) -> dict[tuple[str, str, int], tuple[str, int, str]]:
    """The table's entries for one VM, once it forwards to the VM's address (DHCP takes seconds)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        listing = nft_json("table", "ip", table)
        entries = {k: v for k, v in published(listing).items() if v[2] == f"vm {vm_uuid}"} if listing else {}
        if entries:
            return entries
        await asyncio.sleep(0.5)
    raise AssertionError(f"table {table} never forwarded to {vm_uuid}: {nft_json('table', 'ip', table)}")


async def until(probe: Any, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not probe():
        assert time.monotonic() < deadline, f"{probe} never became true"
        await asyncio.sleep(0.2)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def host() -> AsyncIterator[Host]:
    needs_root_nft()
    conn = system_connection()
    network = conn.networkLookupByName("default")
    bridge = network.bridgeName()
    gateway = ElementTree.fromstring(network.XMLDesc(0)).find("ip").get("address")
    token, root = new_test_root()
    dirs: dict[str, Any] = {"state_dir": root / "state", "log_dir": root / "log", "storage_pool": f"hmtest-{token}"}
    table = f"hmt_{token}"
    localnet_before = localnet.route_localnet(bridge)
    ctl = ControllerDouble()
    await ctl.start()
    agent = AgentProcess(ctl.url, dirs["state_dir"], dirs["log_dir"], uri=SYSTEM_URI, env={
        "HERDSMAN_STORAGE_POOL": dirs["storage_pool"], "HERDSMAN_PORTS_TABLE": table,
        "HERDSMAN_PORT_RANGE": f"{RANGE[0]}-{RANGE[1]}", "HERDSMAN_STREAM_LISTEN": "127.0.0.1:0"})
    try:
        found = Host(ctl, agent, table, dirs, guest_manifest(root / "images"), bridge, gateway,
                     foreign_ruleset(), forward_chain())
        agent.start()
        await ctl.wait_subscribed(timeout=60)
        yield found
    finally:
        agent.kill(signal.SIGKILL)
        await ctl.stop()
        cleanup_test_host(conn, root, dirs["storage_pool"])
        drop_table(table)
        if localnet_before is not None:
            localnet.set_route_localnet(bridge, localnet_before)
        conn.close()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def web(host: Host) -> AsyncIterator[Host]:
    """The guest with busybox httpd on port 80, published on a chosen port everywhere and on a
    chosen port of 127.0.0.1 only."""
    inst = vm_instance("ports-web", memory_mb=160, imageUuid=host.image, userdata=USERDATA, hostname="ports-web",
                       ports=["80", "127.0.0.1::80"])
    host.guest, host.reply = inst, await instance_event(host.ctl, "activate", inst, timeout=300)
    fields_of(host.reply)
    await wait_for(host.console(inst), "HTTPD-STARTED", 300)
    yield host


async def test_activate_reports_the_chosen_ports_and_httpd_answers_through_them(web: Host) -> None:
    everywhere, loopback = fields_of(web.reply)["dockerPorts"]
    port, local = port_of(everywhere), port_of(loopback)
    assert everywhere == f"0.0.0.0:{port}:80/tcp" and loopback == f"127.0.0.1:{local}:80/tcp"
    assert RANGE[0] <= port <= RANGE[1] and RANGE[0] <= local <= RANGE[1] and port != local

    entries = await forwarded_to(web.table, web.guest["uuid"])
    address = entries[("0.0.0.0/0", "tcp", port)][0]
    assert entries == {("0.0.0.0/0", "tcp", port): (address, 80, f"vm {web.guest['uuid']}"),
                       ("127.0.0.1", "tcp", local): (address, 80, f"vm {web.guest['uuid']}")}
    assert ping_instances(await ping(web.ctl))[web.guest["uuid"]]["primaryIpAddress"] == address

    me = host_address()
    assert await fetch(f"http://127.0.0.1:{port}/") == "HELLO-PUBLISHED\n"
    assert await fetch(f"http://{me}:{port}/") == "HELLO-PUBLISHED\n"
    with neighbour() as other:  # another host: prerouting, then FORWARD past libvirt's reject
        got = await asyncio.to_thread(other.fetch, f"http://{other.host_address}:{port}/")
        assert got.stdout == "HELLO-PUBLISHED\n", got.stderr
    assert await fetch(f"http://127.0.0.1:{local}/") == "HELLO-PUBLISHED\n"
    assert refused(me, local)  # published on 127.0.0.1 only

    # an activate again (Cattle re-sends events) answers the same, with the addresses Cattle's
    # docker agents reported alongside
    again = fields_of(await instance_event(web.ctl, "activate", web.guest))
    assert again["dockerPorts"] == [everywhere, loopback]
    assert again["dockerIp"] == address and again["dockerHostIp"]
    assert [line for line in forward_chain() if f"{web.table}-published-ports" in line] == [forward_chain()[0]]


async def test_a_port_another_vm_publishes_is_refused_and_nothing_is_left(web: Host) -> None:
    port = port_of(fields_of(web.reply)["dockerPorts"][0])
    before = table_text(web.table)
    second = vm_instance("ports-second", memory_mb=32, imageUuid=web.image, ports=[f"{free_port()}:8080", f"{port}:80"])
    message = error_of(await instance_event(web.ctl, "activate", second, timeout=120))
    assert message == (f"ports.1: host port 0.0.0.0:{port}/tcp is not free: "
                       f"it is already published by virtual machine {web.guest['uuid']}")
    assert_nothing_left(web, second)
    assert table_text(web.table) == before


async def test_a_port_a_host_process_listens_on_is_refused(web: Host) -> None:
    with socket.socket() as listener:
        listener.bind(("0.0.0.0", 0))
        listener.listen()
        port = listener.getsockname()[1]
        inst = vm_instance("ports-busy", memory_mb=32, imageUuid=web.image, ports=[f"{port}:80"])
        message = error_of(await instance_event(web.ctl, "activate", inst, timeout=120))
    assert message.startswith(f"ports.0: host port 0.0.0.0:{port}/tcp is not free: "
                              f"a host process listens on 0.0.0.0:{port}/tcp ("), message
    assert message.endswith(f", pid {os.getpid()})"), message
    assert_nothing_left(web, inst)


@pytest.mark.parametrize(("mode", "why"), [
    ("bridge", "networkMode bridge puts the VM on a host bridge"),
    ("none", "networkMode none gives the VM no network to forward to"),
])
async def test_ports_without_a_managed_network_are_refused(web: Host, mode: str, why: str) -> None:
    inst = vm_instance(f"ports-{mode}", memory_mb=32, imageUuid=web.image, networkMode=mode, ports=["80"])
    message = error_of(await instance_event(web.ctl, "activate", inst, timeout=120))
    assert message.startswith(f"ports: {why}"), message
    assert_nothing_left(web, inst)


def assert_nothing_left(host: Host, instance: dict[str, Any]) -> None:
    conn = system_connection()
    try:
        with pytest.raises(libvirt.libvirtError):
            conn.lookupByUUIDString(instance["uuid"])
        volumes = [v.name() for v in conn.storagePoolLookupByName(host.dirs["storage_pool"]).listAllVolumes(0)]
    finally:
        conn.close()
    assert not [v for v in volumes if instance["uuid"] in v], volumes
    assert not list(Path(host.dirs["state_dir"]).rglob(f"*{instance['uuid']}*"))
    assert not host.console(instance).exists()


async def test_another_guest_reaches_the_port_through_the_host(web: Host) -> None:
    """Hairpin: a guest on the same network asks the host's addresses, and the answer comes back
    through the host (the table masquerades what it DNATs from the guests' own network)."""
    port, me = port_of(fields_of(web.reply)["dockerPorts"][0]), host_address()
    client = vm_instance("ports-client", memory_mb=160, imageUuid=web.image, hostname="ports-client",
                         userdata=CLIENT.format(gateway=web.gateway, host=me, port=port))
    fields_of(await instance_event(web.ctl, "activate", client, timeout=300))
    try:
        await wait_for(web.console(client), f"HAIRPIN-{web.gateway}-HELLO-PUBLISHED", 180)
        await wait_for(web.console(client), f"HAIRPIN-{me}-HELLO-PUBLISHED", 60)
    finally:
        await instance_event(web.ctl, "purge", client, timeout=120)


async def test_sigkill_and_restart_keep_the_rules_the_vm_and_the_chosen_port(web: Host) -> None:
    uuid_, port = web.guest["uuid"], port_of(fields_of(web.reply)["dockerPorts"][0])
    await forwarded_to(web.table, uuid_)
    rules = table_text(web.table)
    conn = system_connection()
    domain_id = conn.lookupByUUIDString(uuid_).ID()

    web.agent.kill(signal.SIGKILL)
    assert table_text(web.table) == rules  # nobody cleared anything
    assert await fetch(f"http://127.0.0.1:{port}/") == "HELLO-PUBLISHED\n"  # served while the agent is away

    logged = len(web.agent.output())
    await web.restart_agent(signal.SIGKILL)
    await until(lambda: "published ports synced" in web.agent.output()[logged:], 60)
    assert table_text(web.table) == rules, "the restarted agent rebuilt the same table"
    assert conn.lookupByUUIDString(uuid_).ID() == domain_id, "the VM was not touched"
    conn.close()
    assert await fetch(f"http://127.0.0.1:{port}/") == "HELLO-PUBLISHED\n"

    # the agent-chosen port is the VM's for good: activated again after the restart, same answer
    again = fields_of(await instance_event(web.ctl, "activate", web.guest))
    assert again["dockerPorts"] == fields_of(web.reply)["dockerPorts"]


async def test_purge_removes_the_rules_and_changes_no_other_table(web: Host) -> None:
    port, local = (port_of(p) for p in fields_of(web.reply)["dockerPorts"])
    await instance_event(web.ctl, "purge", web.guest, timeout=120)
    # the table goes first, then the FORWARD rule (one sync)
    await until(lambda: nft_json("table", "ip", web.table) is None and forward_chain() == web.forward_before)
    assert refused("127.0.0.1", port) and refused(host_address(), port) and refused("127.0.0.1", local)
    assert foreign_ruleset() == web.others_before
    # its ports are free again: a new VM may have them
    reuse = vm_instance("ports-reuse", memory_mb=32, imageUuid=web.image, startOnCreate=False, ports=[f"{port}:80"])
    assert fields_of(await instance_event(web.ctl, "activate", reuse, timeout=120))["dockerPorts"] == [
        f"0.0.0.0:{port}:80/tcp"]
    await instance_event(web.ctl, "purge", reuse, timeout=120)
