"""Host-port allocation and conflict checks for one VM's `ports`, as a pure function.

Refusals name the spec field (`ports.N`) and say what holds the port: another entry of the same
VM, another VM of this host, or a host process listening on it. A port the agent chose once is
kept on the next activate (the previous bindings come from the VM's metadata), and a new choice
starts at a point derived from the VM's uuid, so a port freed by a purged VM is not handed
straight to the next one. A port the VM already holds is not checked against host listeners
again: the VM keeps its ports while it exists, so activating it twice (Cattle re-sends events)
gives the same answer.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from drivers.ports.model import ANY_ADDRESS, PortBinding, PortRange, PortRequest


class PortConflict(ValueError):
    """A `ports` entry that cannot be published; `field` is its path in the spec."""

    def __init__(self, index: int, message: str) -> None:
        self.field = f"ports.{index}"
        self.reason = message
        super().__init__(f"{self.field}: {message}")


@dataclass(frozen=True)
class Listener:
    """A socket on the host that receives on address:port/protocol (ANY_ADDRESS: all of them)."""

    protocol: str
    address: str
    port: int
    process: str | None = None  # "sshd, pid 612", when known
    inode: int = 0  # the socket's, to find its process when a refusal names it


@dataclass(frozen=True)
class HostView:
    """What the host looks like when a VM is activated (drivers.ports.host.host_view reads it)."""

    addresses: frozenset[str] = frozenset()  # the host's IPv4 addresses
    listeners: tuple[Listener, ...] = ()


@dataclass
class _Holders:
    """Who holds which protocol/port, indexed so probing a port is a dict lookup."""

    by_port: defaultdict[tuple[str, int], list[tuple[str, str]]] = field(default_factory=lambda: defaultdict(list))

    def add(self, protocol: str, address: str, port: int, holder: str) -> None:
        self.by_port[(protocol, port)].append((address, holder))

    def holder(self, protocol: str, address: str, port: int) -> str | None:
        for held, who in self.by_port.get((protocol, port), ()):
            if held == ANY_ADDRESS or address == ANY_ADDRESS or held == address:
                return who
        return None


def _host_address(request: PortRequest, index: int, host: HostView) -> str:
    if request.host_ip is None:
        return ANY_ADDRESS
    try:
        address = ipaddress.ip_address(request.host_ip)
    except ValueError:
        raise PortConflict(index, f"{request.host_ip!r} is not an IP address") from None
    if address.version != 4:
        raise PortConflict(index, f"host address {address} is IPv6; ports are published on IPv4 addresses "
                                  "only (the guests' addresses are IPv4): give an IPv4 address or none")
    text = str(address)
    if text != ANY_ADDRESS and not address.is_loopback and text not in host.addresses:
        raise PortConflict(index, f"host address {text} is not an address of this host")
    return text


def _start(instance_uuid: str, index: int, port_range: PortRange) -> int:
    digest = hashlib.sha256(f"{instance_uuid}/{index}".encode()).digest()
    return int.from_bytes(digest[:4], "big") % len(port_range)


def allocate(instance_uuid: str, requests: Sequence[PortRequest], *,
             others: Mapping[str, Sequence[PortBinding]], host: HostView,
             port_range: PortRange = PortRange(), previous: Sequence[PortBinding] = (),
             owner: Callable[[Listener], str | None] | None = None) -> tuple[PortBinding, ...]:
    """The bindings for `requests`, in order, or PortConflict naming an entry that cannot be had.

    others: every other VM of this host (defined, running or not) → its bindings; a VM keeps
    its ports while it exists. previous: this VM's bindings from its metadata. owner: names the
    process behind a listener when a refusal mentions it (drivers.ports.host.owner).
    """
    vms = _Holders()
    for uuid, bindings in others.items():
        if uuid == instance_uuid:
            continue
        for b in bindings:
            vms.add(b.protocol, b.host_ip, b.host_port, f"virtual machine {uuid}")
    processes: dict[tuple[str, int], list[Listener]] = defaultdict(list)
    for listener in host.listeners:
        processes[(listener.protocol, listener.port)].append(listener)

    def process_holder(protocol: str, address: str, port: int) -> str | None:
        for held in processes.get((protocol, port), ()):
            if held.address == ANY_ADDRESS or address == ANY_ADDRESS or held.address == address:
                who = f"a host process listens on {held.address}:{held.port}/{held.protocol}"
                name = held.process or (owner(held) if owner is not None else None)
                return f"{who} ({name})" if name else who
        return None
    mine = _Holders()
    reusable = [b for b in previous if b.auto]
    held = {(b.protocol, b.host_ip, b.host_port) for b in previous}
    addresses = [_host_address(r, i, host) for i, r in enumerate(requests)]
    chosen: dict[int, PortBinding] = {}

    def taken(protocol: str, address: str, port: int) -> str | None:
        other = mine.holder(protocol, address, port)
        if other is not None:
            return f"it is also {other}"
        other = vms.holder(protocol, address, port)
        if other is not None:
            return f"it is already published by {other}"
        if (protocol, address, port) in held:
            return None  # the VM holds it already, and keeps it while it exists
        return process_holder(protocol, address, port)

    def give(index: int, port: int, auto: bool) -> None:
        request, address = requests[index], addresses[index]
        chosen[index] = PortBinding(protocol=request.protocol, host_ip=address, host_port=port,
                                    guest_port=request.guest_port, auto=auto)
        mine.add(request.protocol, address, port, f"ports.{index}")

    # explicit host ports first, then the ports chosen before, then new choices: a new entry
    # never takes a port an older one had, and an explicit port may displace a chosen one
    for index, request in enumerate(requests):
        if request.host_port is not None:
            reason = taken(request.protocol, addresses[index], request.host_port)
            if reason is not None:
                raise PortConflict(index, f"host port {addresses[index]}:{request.host_port}/{request.protocol} "
                                          f"is not free: {reason}")
            give(index, request.host_port, False)
    for index, request in enumerate(requests):
        if index not in chosen:
            port = _reuse(request, addresses[index], reusable, taken)
            if port is not None:
                give(index, port, True)
    for index, request in enumerate(requests):
        if index not in chosen:
            give(index, _choose(instance_uuid, index, request, addresses[index], port_range, taken), True)
    return tuple(chosen[i] for i in range(len(requests)))


def _reuse(request: PortRequest, address: str, reusable: list[PortBinding],
           taken: Callable[[str, str, int], str | None]) -> int | None:
    for b in reusable:
        if (b.protocol, b.host_ip, b.guest_port) == (request.protocol, address, request.guest_port) \
                and taken(b.protocol, address, b.host_port) is None:
            reusable.remove(b)
            return b.host_port
    return None


def _choose(instance_uuid: str, index: int, request: PortRequest, address: str, port_range: PortRange,
            taken: Callable[[str, str, int], str | None]) -> int:
    size, start = len(port_range), _start(instance_uuid, index, port_range)
    for step in range(size):
        port = port_range.first + (start + step) % size
        if taken(request.protocol, address, port) is None:
            return port
    raise PortConflict(index, f"no free host port for {address}/{request.protocol} in the range {port_range}")
