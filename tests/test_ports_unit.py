"""Published ports, the pure parts: allocation and conflicts, the table's script, what Cattle gets."""

from __future__ import annotations

import ipaddress
import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.spec.fields import parse_port_spec
from drivers.libvirt.domxml import metadata
from drivers.libvirt.domxml.model import AgentMetadata
from drivers.ports.allocate import HostView, Listener, PortConflict, allocate
from drivers.ports.model import (
    PortBinding,
    PortRange,
    PortRequest,
    PublishedVm,
    bindings_from_json,
    bindings_to_json,
    docker_ports,
    requests_from,
)
from drivers.ports.ruleset import TableConfig, render

A, B, C = (str(uuid.UUID(int=i)) for i in (1, 2, 3))
HOST = HostView(addresses=frozenset({"192.0.2.2", "192.168.122.1", "127.0.0.1"}))


def reqs(*texts: str) -> tuple[PortRequest, ...]:
    return requests_from(parse_port_spec(t) for t in texts)


def tcp(port: int, guest: int = 80, ip: str = "0.0.0.0", auto: bool = False) -> PortBinding:
    return PortBinding("tcp", ip, port, guest, auto)


# --- allocation ------------------------------------------------------------------------------------
def test_explicit_ports_are_given_as_asked() -> None:
    got = allocate(A, reqs("8080:80", "127.0.0.1:5353:53/udp", "192.0.2.2:2222:22"), others={}, host=HOST)
    assert docker_ports(got) == ["0.0.0.0:8080:80/tcp", "127.0.0.1:5353:53/udp", "192.0.2.2:2222:22/tcp"]
    assert not any(b.auto for b in got)


def test_a_port_without_host_port_comes_from_the_range_and_is_kept() -> None:
    rng = PortRange(30000, 30009)
    first = allocate(A, reqs("80", "443"), others={}, host=HOST, port_range=rng)
    assert all(30000 <= b.host_port <= 30009 and b.auto for b in first)
    assert first[0].host_port != first[1].host_port
    # the same VM activated again (after an agent restart: previous comes from its metadata)
    again = allocate(A, reqs("80", "443"), others={}, host=HOST, port_range=rng, previous=first)
    assert again == first
    # a new entry in front does not move the ports already handed out
    shifted = allocate(A, reqs("22", "80", "443"), others={}, host=HOST, port_range=rng, previous=first)
    assert shifted[1:] == first


def test_an_explicit_port_displaces_a_chosen_one() -> None:
    rng = PortRange(30000, 30009)
    first = allocate(A, reqs("80"), others={}, host=HOST, port_range=rng)
    later = allocate(A, reqs("80", f"{first[0].host_port}:22"), others={}, host=HOST, port_range=rng, previous=first)
    assert later[1] == tcp(first[0].host_port, 22)
    assert later[0].auto and later[0].host_port != first[0].host_port


def test_the_choice_is_deterministic_and_spread_by_vm() -> None:
    rng = PortRange(20000, 29999)
    a = allocate(A, reqs("80"), others={}, host=HOST, port_range=rng)
    assert allocate(A, reqs("80"), others={}, host=HOST, port_range=rng) == a
    b = allocate(B, reqs("80"), others={}, host=HOST, port_range=rng)
    assert a[0].host_port != b[0].host_port


def test_a_chosen_port_skips_what_others_hold() -> None:
    rng = PortRange(40000, 40002)
    others = {B: [tcp(40000), tcp(40001)]}
    listeners = (Listener("tcp", "0.0.0.0", 40002, "sshd, pid 1"),)
    got = allocate(A, reqs("80/udp", "80"), others={B: [tcp(40000)]}, host=HOST, port_range=rng)
    assert got[1].host_port in (40001, 40002)
    with pytest.raises(PortConflict) as err:
        allocate(A, reqs("80"), others=others, host=HostView(HOST.addresses, listeners), port_range=rng)
    assert str(err.value) == "ports.0: no free host port for 0.0.0.0/tcp in the range 40000-40002"


def test_a_previous_port_taken_meanwhile_is_replaced() -> None:
    rng = PortRange(30000, 30009)
    first = allocate(A, reqs("80"), others={}, host=HOST, port_range=rng)
    later = allocate(A, reqs("80"), others={B: [first[0]]}, host=HOST, port_range=rng, previous=first)
    assert later[0].host_port != first[0].host_port


def test_a_port_the_vm_holds_is_kept_when_a_host_process_listens_on_it_since() -> None:
    """Activating a VM again (Cattle re-sends events) gives the same ports; a new VM is refused."""
    rng = PortRange(30000, 30009)
    first = allocate(A, reqs("8080:80", "80"), others={}, host=HOST, port_range=rng)
    listeners = tuple(Listener("tcp", "0.0.0.0", b.host_port, "nc, pid 7") for b in first)
    view = HostView(HOST.addresses, listeners)
    assert allocate(A, reqs("8080:80", "80"), others={}, host=view, port_range=rng, previous=first) == first
    with pytest.raises(PortConflict, match="a host process listens on 0.0.0.0:8080/tcp"):
        allocate(B, reqs("8080:80"), others={}, host=view, port_range=rng)


@pytest.mark.parametrize(("texts", "others", "listeners", "message"), [
    (["8080:80"], {B: [tcp(8080)]}, (),
     f"ports.0: host port 0.0.0.0:8080/tcp is not free: it is already published by virtual machine {B}"),
    (["127.0.0.1:8080:80"], {B: [tcp(8080)]}, (),
     f"ports.0: host port 127.0.0.1:8080/tcp is not free: it is already published by virtual machine {B}"),
    (["8080:80"], {B: [tcp(8080, ip="127.0.0.1")]}, (),
     f"ports.0: host port 0.0.0.0:8080/tcp is not free: it is already published by virtual machine {B}"),
    (["22:22"], {}, (Listener("tcp", "0.0.0.0", 22, "sshd, pid 612"),),
     "ports.0: host port 0.0.0.0:22/tcp is not free: a host process listens on 0.0.0.0:22/tcp (sshd, pid 612)"),
    (["53:53/udp"], {}, (Listener("udp", "127.0.0.53", 53),),
     "ports.0: host port 0.0.0.0:53/udp is not free: a host process listens on 127.0.0.53:53/udp"),
    (["80:80", "8080:80", "0.0.0.0:8080:81"], {}, (),
     "ports.2: host port 0.0.0.0:8080/tcp is not free: it is also ports.1"),
    (["[::1]:8080:80"], {}, (), "ports.0: host address ::1 is IPv6; ports are published on IPv4 addresses "
                                "only (the guests' addresses are IPv4): give an IPv4 address or none"),
    (["10.9.9.9:8080:80"], {}, (), "ports.0: host address 10.9.9.9 is not an address of this host"),
])
def test_conflicts_are_refused_naming_the_field(texts, others, listeners, message) -> None:
    with pytest.raises(PortConflict) as err:
        allocate(A, reqs(*texts), others=others, host=HostView(HOST.addresses, listeners))
    assert str(err.value) == message
    assert err.value.field == message.split(":")[0]


@pytest.mark.parametrize(("texts", "others", "listeners"), [
    (["8080:80/udp"], {B: [tcp(8080)]}, ()),  # another protocol
    (["127.0.0.1:8080:80"], {B: [tcp(8080, ip="192.0.2.2")]}, ()),  # another address
    (["192.0.2.2:22:22"], {}, (Listener("tcp", "127.0.0.1", 22),)),
    (["127.0.0.2:8080:80"], {}, ()),  # all of 127.0.0.0/8 is the host's
    (["8080:80"], {A: [tcp(8080)]}, ()),  # the VM's own earlier binding is not "another VM"
])
def test_what_does_not_conflict(texts, others, listeners) -> None:
    allocate(A, reqs(*texts), others=others, host=HostView(HOST.addresses, listeners))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["", "127.0.0.1:", "192.0.2.2:"]), st.sampled_from(["", "7000:", "7001:"]),
                          st.integers(1, 3), st.sampled_from(["tcp", "udp"])), max_size=8))
def test_bindings_of_one_vm_never_overlap(entries) -> None:
    texts = [f"{ip}{hp}{gp}/{proto}" if ip == "" or hp else f"{ip}:{gp}/{proto}" for ip, hp, gp, proto in entries]
    try:
        got = allocate(A, reqs(*texts), others={}, host=HOST, port_range=PortRange(7000, 7003))
    except PortConflict:
        return
    for i, b in enumerate(got):
        assert not any(o.overlaps(b.protocol, b.host_ip, b.host_port) for o in got[:i])


# --- the record in the metadata, and what Cattle gets ---------------------------------------------
def test_bindings_round_trip_through_the_domain_metadata() -> None:
    bindings = (tcp(8080), PortBinding("udp", "127.0.0.1", 25000, 53, auto=True))
    assert bindings_from_json(bindings_to_json(bindings)) == bindings
    meta = AgentMetadata(instance_uuid=A, spec_hash="ff", ports=bindings)
    assert metadata.parse_metadata(metadata.metadata_xml(meta)).ports == bindings
    assert "<ports>" not in metadata.metadata_xml(AgentMetadata(instance_uuid=A, spec_hash="ff"))
    # unreadable ports lose the reservation, never the VM
    broken = metadata.metadata_xml(meta).replace('"hostPort":8080', '"hostPort":"x"')
    assert metadata.parse_metadata(broken).ports == ()
    assert metadata.parse_metadata(broken).instance_uuid == A


def test_docker_ports_strings() -> None:
    assert docker_ports([tcp(8080), PortBinding("udp", "127.0.0.1", 5353, 53)]) == \
        ["0.0.0.0:8080:80/tcp", "127.0.0.1:5353:53/udp"]


def test_port_range_parse() -> None:
    assert PortRange.parse("20000-29999") == PortRange(20000, 29999)
    assert len(PortRange.parse("8080")) == 1
    for bad in ("a-b", "30000-20000", "0-10", "1-70000", "-5"):
        with pytest.raises(ValueError):
            PortRange.parse(bad)


# --- the ruleset -----------------------------------------------------------------------------------
NET = {"virbr0": [ipaddress.IPv4Network("192.168.122.0/24")]}


def test_no_forwarded_vm_deletes_the_table() -> None:
    for vms in ([], [PublishedVm(A, (tcp(8080),), None, "virbr0")], [PublishedVm(A, (), "192.168.122.5", "virbr0")]):
        r = render(vms, networks=NET)
        assert r.empty and r.text == "table ip herdsman {}\ndelete table ip herdsman\n"


def test_the_table_forwards_each_binding_to_its_vm() -> None:
    vms = [PublishedVm(B, (PortBinding("udp", "127.0.0.1", 5353, 53),), "192.168.122.6", "virbr0"),
           PublishedVm(A, (tcp(8080), tcp(8443, 443, "192.0.2.2")), "192.168.122.5", "virbr0")]
    r = render(vms, networks=NET, config=TableConfig("hm_t", 0x100))
    lines = r.text.splitlines()
    assert lines[:3] == ["table ip hm_t {}", "delete table ip hm_t", "table ip hm_t {"]
    assert f'0.0.0.0/0 . tcp . 8080 comment "vm {A}" : 192.168.122.5 . 80' in r.text
    assert f'192.0.2.2 . tcp . 8443 comment "vm {A}" : 192.168.122.5 . 443' in r.text
    assert f'127.0.0.1 . udp . 5353 comment "vm {B}" : 192.168.122.6 . 53' in r.text
    assert 'elements = { "virbr0" . 192.168.122.0/24 }' in r.text
    assert "ct mark set ct mark | 0x00000100" in r.text
    assert r.forwarded == 3 and r.localnet_bridges == ("virbr0",)
    # the same VMs in another order give the same text
    assert render(list(reversed(vms)), networks=NET, config=TableConfig("hm_t", 0x100)).text == r.text


def test_route_localnet_only_where_a_binding_covers_loopback() -> None:
    vms = [PublishedVm(A, (tcp(8443, 443, "192.0.2.2"),), "192.168.122.5", "virbr0"),
           PublishedVm(B, (tcp(8080, ip="127.0.0.1"),), "10.0.0.5", "virbr1")]
    r = render(vms)
    assert r.localnet_bridges == ("virbr1",)
    assert 'elements = { "virbr1" }' in r.text


def test_overlapping_bindings_from_metadata_keep_the_first_and_report_the_rest() -> None:
    vms = [PublishedVm(B, (tcp(8080, ip="127.0.0.1"),), "192.168.122.6", "virbr0"),
           PublishedVm(A, (tcp(8080),), "192.168.122.5", "virbr0")]
    r = render(vms, networks=NET)
    assert r.forwarded == 1 and f'comment "vm {A}"' in r.text and f'comment "vm {B}"' not in r.text
    assert [(s.instance_uuid, s.holder) for s in r.skipped] == [(B, A)]


def test_nothing_unvalidated_reaches_the_script() -> None:
    with pytest.raises(ValueError):
        PublishedVm(A, (tcp(80),), "192.168.122.5", 'virbr0" ; flush ruleset ; "')
    with pytest.raises(ValueError):
        PublishedVm(A, (tcp(80),), "192.168.122.5 . 1", "virbr0")
    with pytest.raises(ValueError):
        PublishedVm("x; flush ruleset", (tcp(80),), "192.168.122.5", "virbr0")
    with pytest.raises(ValueError):
        PortBinding("icmp", "0.0.0.0", 1, 1)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        TableConfig("filter; flush ruleset")
    with pytest.raises(ValueError):
        TableConfig("hm", mark=0x3)


def test_listeners_are_read_from_proc_net(tmp_path) -> None:
    from drivers.ports.host import listeners

    head = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"
    (tmp_path / "tcp").write_text(head +
        "   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 111 1\n"
        "   1: 0202000A:0016 0302000A:D431 01 00000000:00000000 00:00000000 00000000     0        0 112 1\n")
    (tmp_path / "tcp6").write_text(head +
        "   0: 00000000000000000000000000000000:0050 00000000000000000000000000000000:0000 0A 0 0 0 0 0 113 1\n"
        "   1: 00000000000000000000000001000000:0051 00000000000000000000000000000000:0000 0A 0 0 0 0 0 114 1\n"
        "   2: 0000000000000000FFFF00000202000A:0052 00000000000000000000000000000000:0000 0A 0 0 0 0 0 115 1\n")
    (tmp_path / "udp").write_text(head +
        "   0: 3500007F:0035 00000000:0000 07 00000000:00000000 00:00000000 00000000   101        0 116 2\n")
    assert {(l.protocol, l.address, l.port, l.inode) for l in listeners(root=tmp_path)} == {
        ("tcp", "127.0.0.1", 8080, 111),  # the established socket (st 01) is not a listener
        ("tcp", "0.0.0.0", 80, 113),  # '::' takes IPv4 too; '::1' (port 81) does not
        ("tcp", "10.0.2.2", 82, 115),  # v4-mapped
        ("udp", "127.0.0.53", 53, 116),
    }
