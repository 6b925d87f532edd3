"""The whole of herdsman's nftables table, as text for `nft -f`, from the published ports of all VMs.

One pure function: the same VMs give the same text, and applying it replaces the table in one
transaction (declare, delete, recreate), so a sync from scratch after an agent restart is the
same operation as an update. Nothing outside our table is named.

    table ip herdsman
      map published      (host address . protocol . host port) → (guest address . guest port);
                         interval keys, so 0.0.0.0/0 stands for every address of the host
      chain prerouting   nat, dstnat:  traffic to a local address → DNAT through `published`
      chain output       nat, -100:    the same for connections the host itself makes
                                       (curl 127.0.0.1:8080 or <host ip>:8080 on the host)
      chain postrouting  nat, srcnat:  masquerade what we DNATed when it came from 127.0.0.0/8
                                       (the guest could not answer 127.0.0.1) or from the guest's
                                       own network (hairpin: the reply must come back through us)
      chain guard        filter, raw:  drop packets for 127.0.0.0/8 arriving on a bridge where
                                       route_localnet is on (drivers.ports.localnet), so guests
                                       cannot reach the host's loopback services through it
Connections we DNAT carry the conntrack mark bit `mark`; drivers.ports.forward accepts them in
the FORWARD chain, ahead of libvirt's reject.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from drivers.ports.model import ANY_ADDRESS, PortBinding, PublishedVm, check_ifname

DEFAULT_TABLE = "herdsman"
#: The conntrack mark bit of connections we DNAT (other bits of the mark are left as they are).
DEFAULT_MARK = 0x01000000
_TABLE_RE = re.compile(r"^[a-z][a-z0-9_]{0,31}$")


@dataclass(frozen=True)
class TableConfig:
    name: str = DEFAULT_TABLE
    mark: int = DEFAULT_MARK

    def __post_init__(self) -> None:
        if not _TABLE_RE.match(self.name):
            raise ValueError(f"{self.name!r} is not a table name we use (lowercase letters, digits, '_')")
        if self.mark <= 0 or self.mark >= 1 << 32 or self.mark & (self.mark - 1):
            raise ValueError(f"conntrack mark {self.mark:#x} must be a single bit")


@dataclass(frozen=True)
class Skipped:
    """A binding left out of the table because an earlier VM's binding already holds its port."""

    instance_uuid: str
    binding: PortBinding
    holder: str


@dataclass(frozen=True)
class Ruleset:
    text: str
    #: bridges whose route_localnet must be on (some binding covers 127.0.0.1 on them)
    localnet_bridges: tuple[str, ...] = ()
    forwarded: int = 0
    skipped: tuple[Skipped, ...] = field(default_factory=tuple)

    @property
    def empty(self) -> bool:
        return self.forwarded == 0


def _covers_loopback(b: PortBinding) -> bool:
    return b.wildcard or ipaddress.IPv4Address(b.host_ip).is_loopback


def _key(b: PortBinding) -> str:
    address = "0.0.0.0/0" if b.host_ip == ANY_ADDRESS else b.host_ip
    return f"{address} . {b.protocol} . {b.host_port}"


def render(vms: Iterable[PublishedVm], *, networks: Mapping[str, Iterable[ipaddress.IPv4Network]] | None = None,
           config: TableConfig = TableConfig()) -> Ruleset:
    """The nft script for these VMs. VMs without an address or without bindings forward nothing.

    networks: each bridge's IPv4 networks (drivers.ports.host.bridge_networks), for hairpin
    masquerading; a bridge not given gets none (guests then reach other guests' published ports
    only at their own addresses).
    """
    table = f"ip {config.name}"
    header = f"table {table} {{}}\ndelete table {table}\n"
    elements: list[str] = []
    held: dict[tuple[str, int], list[tuple[str, str]]] = {}
    skipped: list[Skipped] = []
    localnet: set[str] = set()
    bridges: set[str] = set()
    for vm in sorted(vms, key=lambda v: v.instance_uuid):
        if not vm.forwarded:
            continue
        for b in sorted(vm.bindings):
            holders = held.setdefault((b.protocol, b.host_port), [])
            clash = next((who for ip, who in holders if b.overlaps(b.protocol, ip, b.host_port)), None)
            if clash is not None:
                skipped.append(Skipped(vm.instance_uuid, b, clash))
                continue
            holders.append((b.host_ip, vm.instance_uuid))
            elements.append(f'{_key(b)} comment "vm {vm.instance_uuid}" : {vm.address} . {b.guest_port}')
            if vm.bridge is not None:
                bridges.add(vm.bridge)
                if _covers_loopback(b):
                    localnet.add(vm.bridge)
    if not elements:
        return Ruleset(text=header, skipped=tuple(skipped))

    hairpin = sorted(
        f'"{check_ifname(bridge)}" . {net}'
        for bridge in bridges for net in (networks or {}).get(bridge, ())
    )
    text = header + _table_text(table, config.mark, elements, hairpin, sorted(f'"{check_ifname(b)}"' for b in localnet))
    return Ruleset(text=text, localnet_bridges=tuple(sorted(localnet)), forwarded=len(elements),
                   skipped=tuple(skipped))


def _set(name: str, kind: str, elements: list[str], flags: str | None = None) -> list[str]:
    lines = [f"\t{name} {{", f"\t\ttype {kind}"]
    if flags:
        lines.append(f"\t\tflags {flags}")
    if elements:
        lines.append("\t\telements = { " + ",\n\t\t\t\t".join(elements) + " }")
    return lines + ["\t}"]


def _table_text(table: str, mark_bit: int, published: list[str], hairpin: list[str], localnet: list[str]) -> str:
    mark = f"{mark_bit:#010x}"
    lines = [
        f"table {table} {{",
        "\tcomment \"published ports of herdsman's VMs; rewritten whole by the agent\"",
        *_set("map published", "ipv4_addr . inet_proto . inet_service : ipv4_addr . inet_service", published, "interval"),
        *_set("set hairpin", "ifname . ipv4_addr", hairpin, "interval"),
        *_set("set localnet_bridges", "ifname", localnet),
        "\tchain publish {",
        "\t\tmeta l4proto { tcp, udp, sctp } ip daddr . meta l4proto . th dport @published"
        f" ct mark set ct mark | {mark}",
        "\t\tmeta l4proto { tcp, udp, sctp } dnat ip to ip daddr . meta l4proto . th dport map @published",
        "\t}",
        "\tchain prerouting {",
        "\t\ttype nat hook prerouting priority dstnat; policy accept;",
        "\t\tfib daddr type local jump publish",
        "\t}",
        "\tchain output {",
        "\t\ttype nat hook output priority -100; policy accept;",
        "\t\tfib daddr type local jump publish",
        "\t}",
        "\tchain postrouting {",
        "\t\ttype nat hook postrouting priority srcnat; policy accept;",
        f"\t\tct mark & {mark} == {mark} ip saddr 127.0.0.0/8 masquerade",
        f"\t\tct mark & {mark} == {mark} oifname . ip saddr @hairpin masquerade",
        "\t}",
        "\tchain guard {",
        "\t\ttype filter hook prerouting priority raw; policy accept;",
        "\t\tiifname @localnet_bridges ip daddr 127.0.0.0/8 drop",
        "\t}",
        "}",
    ]
    return "\n".join(lines) + "\n"
