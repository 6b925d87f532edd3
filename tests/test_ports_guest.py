"""Published ports end to end: busybox httpd in the real test guest, reached through a host port.

The guest boots through the real agent on libvirt's `default` network (tests/streams_vm.py);
the test then does what the driver will do (allocate, sync with the guest's lease address) and
fetches the page the ways users do: from the host on 127.0.0.1 and on the host's own address,
from another host (a network namespace behind a veth pair, so through FORWARD and libvirt's
rules), and from a second guest on the same network through the host's addresses (hairpin).
(The guest's busybox has no UDP server; tests/test_ports_nft.py sends UDP to a peer in a
network namespace.)
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import os
import random
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import libvirt
import pytest

from agent.spec.fields import parse_port_spec
from drivers.ports import localnet
from drivers.ports.allocate import PortConflict
from drivers.ports.model import PortRange, PublishedVm, docker_ports, requests_from
from drivers.ports.publisher import PortPublisher
from drivers.ports.ruleset import TableConfig
from tests.libvirtd_fixtures import SYSTEM_URI
from tests.ports_fixtures import drop_forward_rules, forward_chain, needs_root_nft, nft_json, published
from tests.streams_vm import net_guest
from tests.test_e2e_guest import wait_for

pytestmark = [pytest.mark.libvirtd, pytest.mark.guest, pytest.mark.timeout(900)]


@dataclass
class Neighbour:
    """Another host: a network namespace joined to this one by a veth pair."""

    namespace: str
    host_address: str  # this host's end, the address the neighbour connects to

    def fetch(self, url: str) -> subprocess.CompletedProcess[str]:
        code = "import sys, urllib.request; sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())"
        return subprocess.run(["ip", "netns", "exec", self.namespace, sys.executable, "-c", code, url],
                              capture_output=True, text=True, timeout=30)


@contextlib.contextmanager
def neighbour() -> Iterator[Neighbour]:
    token = uuid.uuid4().hex[:8]
    ns, here, there = f"hmt-{token}", f"hmt{token}a", f"hmt{token}b"
    subnet = ipaddress.IPv4Network(f"100.{random.randint(80, 120)}.{random.randint(0, 255)}.{4 * random.randint(0, 63)}/30")
    mine, theirs = (str(a) for a in subnet.hosts())
    try:
        for cmd in (["ip", "netns", "add", ns],
                    ["ip", "link", "add", here, "type", "veth", "peer", "name", there],
                    ["ip", "link", "set", there, "netns", ns],
                    ["ip", "addr", "add", f"{mine}/30", "dev", here],
                    ["ip", "link", "set", here, "up"],
                    ["ip", "-n", ns, "addr", "add", f"{theirs}/30", "dev", there],
                    ["ip", "-n", ns, "link", "set", there, "up"],
                    ["ip", "-n", ns, "link", "set", "lo", "up"],
                    ["ip", "-n", ns, "route", "add", "default", "via", mine]):
            subprocess.run(cmd, check=True, capture_output=True)
        yield Neighbour(ns, mine)
    finally:
        subprocess.run(["ip", "link", "del", here], capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def host_address() -> str:
    """This host's address on its default route (what other machines call it)."""
    route = json.loads(subprocess.run(["ip", "-j", "route", "get", "192.0.2.123"], capture_output=True, text=True,
                                      check=True).stdout)[0]
    return route["prefsrc"]


async def fetch(url: str, attempts: int = 20) -> str:
    """GET url from this host; a few tries, the guest's httpd may still be starting."""
    error: Exception | None = None
    for _ in range(attempts):
        try:
            return await asyncio.to_thread(_get, url)
        except OSError as exc:
            error = exc
            await asyncio.sleep(0.5)
    raise AssertionError(f"{url}: {error}")


def _get(url: str) -> str:
    import urllib.request
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.read().decode()


def refused(address: str, port: int) -> bool:
    try:
        with socket.create_connection((address, port), timeout=3):
            return False
    except OSError:
        return True


USERDATA = """#!/bin/sh
mkdir -p /www && echo HELLO-PUBLISHED > /www/index.html && busybox httpd -p 80 -h /www
echo HTTPD-STARTED
"""

#: the second guest asks the host's addresses for the first guest's page (busybox wget crashes
#: in this static build, so a plain HTTP request through nc)
CLIENT = """#!/bin/sh
( for target in 192.168.122.1 {host}; do
    for i in $(seq 1 60); do
      printf 'GET / HTTP/1.0\\r\\n\\r\\n' | timeout 5 nc $target {port} > /tmp/page 2>/dev/null
      if grep -q HELLO-PUBLISHED /tmp/page; then echo "HAIRPIN-$target-$(tail -n 1 /tmp/page)"; break; fi
      sleep 1
    done
  done ) &
echo CLIENT-STARTED
"""


async def test_a_published_port_reaches_busybox_httpd_in_the_guest() -> None:
    needs_root_nft()
    table = TableConfig(name=f"hmt_{uuid.uuid4().hex[:8]}")
    publisher = PortPublisher(table=table, port_range=PortRange(18000, 18999))
    vm_uuid = str(uuid.uuid4())
    # what activate will do: the agent chooses the host ports before the VM exists
    bindings = publisher.allocate(vm_uuid, requests_from(parse_port_spec(p) for p in ("80", "127.0.0.1::80")), others={})
    web, local = bindings
    assert 18000 <= web.host_port <= 18999 and web.auto
    assert docker_ports(bindings) == [f"0.0.0.0:{web.host_port}:80/tcp", f"127.0.0.1:{local.host_port}:80/tcp"]
    conn = libvirt.open(SYSTEM_URI)
    bridge = conn.networkLookupByName("default").bridgeName()
    conn.close()
    localnet_before = localnet.route_localnet(bridge)
    chain_before = forward_chain()
    me = host_address()
    try:
        async with net_guest("ports-guest", USERDATA.replace("{port}", str(web.host_port)),
                             ready_marker="HTTPD-STARTED") as guest:
            deadline = time.monotonic() + 60
            while not (address := guest.agent.driver.primary_address(guest.uuid)):
                assert time.monotonic() < deadline, "the guest never got an address"
                await asyncio.sleep(0.5)
            # the driver's part: sync with the lease address once it is known
            result = publisher.sync([PublishedVm(guest.uuid, bindings, address, bridge)])
            assert result.forwarded == 2 and result.forward_rule and result.localnet_bridges == (bridge,)
            listing = nft_json("table", "ip", table.name)
            assert published(listing)[("0.0.0.0/0", "tcp", web.host_port)] == (address, 80, f"vm {guest.uuid}")

            # from the host itself: loopback and the host's own address (the output hook)
            assert await fetch(f"http://127.0.0.1:{web.host_port}/") == "HELLO-PUBLISHED\n"
            assert await fetch(f"http://{me}:{web.host_port}/") == "HELLO-PUBLISHED\n"
            # from another host: prerouting, then FORWARD past libvirt's reject
            with neighbour() as other:
                got = await asyncio.to_thread(other.fetch, f"http://{other.host_address}:{web.host_port}/")
                assert got.stdout == "HELLO-PUBLISHED\n", got.stderr
            # a second VM asking for the same host port is refused, naming the field and the VM
            with pytest.raises(PortConflict) as refused_port:
                publisher.allocate(str(uuid.uuid4()), requests_from([parse_port_spec(f"{web.host_port}:8080")]),
                                   others={guest.uuid: bindings})
            assert str(refused_port.value) == (f"ports.0: host port 0.0.0.0:{web.host_port}/tcp is not free: "
                                               f"it is already published by virtual machine {guest.uuid}")
            # from another VM on the same network, through the host's addresses (hairpin)
            client = CLIENT.replace("{host}", me).replace("{port}", str(web.host_port))
            async with net_guest("ports-client", client, ready_marker="CLIENT-STARTED") as other_vm:
                await wait_for(other_vm.log, "HAIRPIN-192.168.122.1-HELLO-PUBLISHED", 120)
                await wait_for(other_vm.log, f"HAIRPIN-{me}-HELLO-PUBLISHED", 60)
            # a binding on 127.0.0.1 only: reachable there, not on the host's address
            assert await fetch(f"http://127.0.0.1:{local.host_port}/") == "HELLO-PUBLISHED\n"
            assert refused(me, local.host_port)

            # purge: nothing left, and the port is closed again
            publisher.clear()
            assert nft_json("table", "ip", table.name) is None
            assert forward_chain() == chain_before
            assert localnet.route_localnet(bridge) is False
            assert refused("127.0.0.1", web.host_port) and refused(me, web.host_port)
            assert refused("127.0.0.1", local.host_port)
    finally:
        publisher.clear()
        drop_forward_rules(f"{table.name}-published-ports")
        if localnet_before is not None:
            localnet.set_route_localnet(bridge, localnet_before)
