"""The table on this host's real nftables (root): apply, sync, remove; nothing else touched."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator

import psutil
import pytest

from drivers.ports import localnet, nft
from drivers.ports.forward import ForwardRule
from drivers.ports.allocate import PortConflict
from drivers.ports.model import PortBinding, PortRequest, PublishedVm
from drivers.ports.publisher import PortPublisher
from drivers.ports.ruleset import TableConfig
from tests.ports_fixtures import (
    chains,
    drop_forward_rules,
    elements,
    forward_chain,
    needs_root_nft,
    nft_json,
    published,
    ruleset_except,
    table,  # noqa: F401 (fixture)
)

A, B = str(uuid.uuid4()), str(uuid.uuid4())


def tcp(port: int, guest: int = 80, ip: str = "0.0.0.0") -> PortBinding:
    return PortBinding("tcp", ip, port, guest)


@pytest.fixture
def bridge() -> Iterator[str]:
    """An empty bridge of our own standing in for a libvirt network's (route_localnet is per interface)."""
    needs_root_nft()
    name = f"hmt{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "link", "add", name, "type", "bridge"], check=True)
    subprocess.run(["ip", "addr", "add", "100.127.250.1/29", "dev", name], check=True)
    yield name
    subprocess.run(["ip", "link", "del", name], check=False)


def test_sync_builds_updates_and_removes_only_our_table(table: TableConfig, bridge: str) -> None:
    publisher = PortPublisher(table=table, forward_rule=False)
    others_before = ruleset_except(table.name)
    vm_a = PublishedVm(A, (tcp(31080), PortBinding("udp", "127.0.0.1", 31053, 53)), "100.127.250.2", bridge)
    vm_b = PublishedVm(B, (tcp(31081, 8080, "127.0.0.1"),), "100.127.250.3", bridge)

    result = publisher.sync([vm_a, vm_b])
    assert result.forwarded == 3 and result.localnet_bridges == (bridge,)
    listing = nft_json("table", "ip", table.name)
    assert listing is not None
    assert published(listing) == {
        ("0.0.0.0/0", "tcp", 31080): ("100.127.250.2", 80, f"vm {A}"),
        ("127.0.0.1", "udp", 31053): ("100.127.250.2", 53, f"vm {A}"),
        ("127.0.0.1", "tcp", 31081): ("100.127.250.3", 8080, f"vm {B}"),
    }
    hooks = {name: (c.get("type"), c.get("hook"), c.get("prio")) for name, c in chains(listing).items()}
    assert hooks == {"publish": (None, None, None), "prerouting": ("nat", "prerouting", -100),
                     "output": ("nat", "output", -100), "postrouting": ("nat", "postrouting", 100),
                     "guard": ("filter", "prerouting", -300)}
    assert elements(listing, "localnet_bridges") == [bridge]
    assert elements(listing, "hairpin") == [{"concat": [bridge, {"prefix": {"addr": "100.127.250.0", "len": 29}}]}]
    assert localnet.route_localnet(bridge) is True

    # the same VMs again: the same table (a sync from scratch after an agent restart is this)
    publisher.sync([vm_b, vm_a])
    again = nft_json("table", "ip", table.name)
    assert published(again) == published(listing)

    # one VM goes, the other's binding moves off loopback: route_localnet is not needed any more
    publisher.sync([PublishedVm(A, (tcp(31090, ip="100.127.250.1"),), "100.127.250.2", bridge)])
    listing = nft_json("table", "ip", table.name)
    assert published(listing) == {("100.127.250.1", "tcp", 31090): ("100.127.250.2", 80, f"vm {A}")}
    assert elements(listing, "localnet_bridges") == []
    assert localnet.route_localnet(bridge) is False

    # no address yet (no DHCP lease): nothing forwarded, the table goes
    result = publisher.sync([PublishedVm(A, (tcp(31090),), None, bridge)])
    assert result.forwarded == 0 and nft_json("table", "ip", table.name) is None
    assert ruleset_except(table.name) == others_before


def test_clear_turns_route_localnet_off_and_leaves_nothing(table: TableConfig, bridge: str) -> None:
    publisher = PortPublisher(table=table, forward_rule=False)
    publisher.sync([PublishedVm(A, (tcp(31100),), "100.127.250.2", bridge)])
    assert localnet.route_localnet(bridge) is True
    publisher.clear()
    assert nft_json("table", "ip", table.name) is None
    assert localnet.route_localnet(bridge) is False
    publisher.clear()  # twice is fine: a purge repeated, a restart with no VM


def test_a_refused_script_changes_nothing(table: TableConfig) -> None:
    publisher = PortPublisher(table=table, forward_rule=False)
    publisher.sync([PublishedVm(A, (tcp(31200),), "100.127.250.2", None)])
    before = nft_json("table", "ip", table.name)
    script = f"table ip {table.name} {{}}\ndelete table ip {table.name}\ntable ip {table.name} {{ chain c {{ nonsense }} }}\n"
    with pytest.raises(nft.NftError, match="syntax error"):
        nft.apply(script)
    assert nft_json("table", "ip", table.name) == before


def test_the_forward_rule_stays_first_and_goes_with_the_table(table: TableConfig) -> None:
    publisher = PortPublisher(table=table)
    comment = f"{table.name}-published-ports"
    other = f"{table.name}-stand-in"
    chain_before = forward_chain()
    try:
        result = publisher.sync([PublishedVm(A, (tcp(31300),), "100.127.250.2", None)])
        assert result.forward_rule
        rule = publisher.forward
        assert isinstance(rule, ForwardRule) and rule.position() == [1]
        first = forward_chain()[0]
        assert f"--comment {comment}" in first and "--mark 0x1000000/0x1000000" in first and "--ctstate DNAT" in first
        # something inserted ahead of it (libvirt re-creating its jumps does that): the next sync
        # puts ours back in front, once
        subprocess.run(["iptables", "-w", "-I", "FORWARD", "1", "-m", "comment", "--comment", other], check=True)
        publisher.sync([PublishedVm(A, (tcp(31300),), "100.127.250.2", None)])
        assert rule.position() == [1]
        assert sum(f"--comment {comment}" in line for line in forward_chain()) == 1
        subprocess.run(["iptables", "-w", "-D", "FORWARD", "-m", "comment", "--comment", other], check=True)
        publisher.clear()
        assert rule.position() == []
        assert forward_chain() == chain_before
    finally:
        drop_forward_rules(other)


def test_a_host_listener_is_refused_and_named(table: TableConfig) -> None:
    """The real host: psutil sees this process's sockets, and the refusal says who holds the port."""
    publisher = PortPublisher(table=table)
    with socket.socket() as tcp_sock, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp_sock:
        tcp_sock.bind(("0.0.0.0", 0))
        tcp_sock.listen()
        udp_sock.bind(("127.0.0.1", 0))
        tcp_port, udp_port = tcp_sock.getsockname()[1], udp_sock.getsockname()[1]
        me = f"{psutil.Process().name()}, pid {os.getpid()}"
        with pytest.raises(PortConflict) as err:
            publisher.allocate(A, [PortRequest(80, tcp_port, "127.0.0.1")], others={})
        assert str(err.value) == (f"ports.0: host port 127.0.0.1:{tcp_port}/tcp is not free: "
                                  f"a host process listens on 0.0.0.0:{tcp_port}/tcp ({me})")
        with pytest.raises(PortConflict, match=f"ports.1: host port 0.0.0.0:{udp_port}/udp is not free"):
            publisher.allocate(A, [PortRequest(80), PortRequest(53, udp_port, None, "udp")], others={})
        # another protocol, or another address than the listener's, is free
        publisher.allocate(A, [PortRequest(80, tcp_port, None, "udp"), PortRequest(53, udp_port, None, "tcp")], others={})


UDP_ECHO = """
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", 5300))
print("ready", flush=True)
while True:
    data, peer = s.recvfrom(2048)
    s.sendto(b"echo " + peer[0].encode() + b" " + data, peer)
"""


def test_udp_reaches_a_peer_behind_a_bridge(table: TableConfig, bridge: str) -> None:
    """A UDP echo server in a network namespace on a bridge of our own stands in for a guest."""
    ns, outside, inside = f"{bridge}-ns", f"{bridge}a", f"{bridge}b"
    peer = "100.127.250.2"
    server = None
    try:
        for cmd in (["ip", "netns", "add", ns], ["ip", "link", "add", outside, "type", "veth", "peer", "name", inside],
                    ["ip", "link", "set", outside, "master", bridge], ["ip", "link", "set", outside, "up"],
                    ["ip", "link", "set", bridge, "up"], ["ip", "link", "set", inside, "netns", ns],
                    ["ip", "-n", ns, "addr", "add", f"{peer}/29", "dev", inside], ["ip", "-n", ns, "link", "set", inside, "up"],
                    ["ip", "-n", ns, "route", "add", "default", "via", "100.127.250.1"]):
            subprocess.run(cmd, check=True, capture_output=True)
        server = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", UDP_ECHO], stdout=subprocess.PIPE, text=True)
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        publisher = PortPublisher(table=table, forward_rule=False)
        (binding,) = publisher.allocate(A, [PortRequest(5300, None, None, "udp")], others={})
        publisher.sync([PublishedVm(A, (binding,), peer, bridge)])
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(5)
            s.sendto(b"over-udp", ("127.0.0.1", binding.host_port))
            reply, source = s.recvfrom(2048)
        # the peer saw the host's bridge address (127.0.0.1 was masqueraded), the reply came back
        # from the published port
        assert reply == b"echo 100.127.250.1 over-udp" and source == ("127.0.0.1", binding.host_port)
        publisher.clear()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(1)
            s.sendto(b"after-clear", ("127.0.0.1", binding.host_port))
            with pytest.raises(OSError):  # refused (ICMP) or timed out: nothing forwards it any more
                s.recvfrom(2048)
    finally:
        if server is not None:
            server.kill()
            server.wait()
        subprocess.run(["ip", "link", "del", outside], capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
