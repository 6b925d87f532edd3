"""Typed records of published ports: what a VM asks for, what it was given, what gets forwarded.

Independent of the agent package: the driver converts the spec's `ports` into PortRequests and
stores the resulting PortBindings in the VM's metadata, so they survive agent restarts.
"""

from __future__ import annotations

import ipaddress
import json
import re
import uuid as uuid_module
from dataclasses import dataclass
from collections.abc import Iterable
from typing import Literal, Protocol as TypingProtocol, get_args

Protocol = Literal["tcp", "udp", "sctp"]
PROTOCOLS: tuple[str, ...] = get_args(Protocol)
ANY_ADDRESS = "0.0.0.0"

#: Linux interface names (IFNAMSIZ 16 with the NUL); they are written into nft scripts.
_IFNAME_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,15}$")


def check_port(value: int, what: str = "port") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise ValueError(f"{what} {value!r} is not a port number (1-65535)")
    return value


def check_protocol(value: str) -> Protocol:
    if value not in PROTOCOLS:
        raise ValueError(f"protocol {value!r} must be one of {', '.join(PROTOCOLS)}")
    return value  # type: ignore[return-value]


def check_ipv4(value: str, what: str = "address") -> str:
    try:
        return str(ipaddress.IPv4Address(value))
    except ValueError:
        raise ValueError(f"{what} {value!r} is not an IPv4 address") from None


def check_ifname(value: str) -> str:
    if not _IFNAME_RE.match(value):
        raise ValueError(f"{value!r} is not a network interface name")
    return value


@dataclass(frozen=True)
class PortRange:
    """The host ports the agent may choose from for a `ports` entry without a host port."""

    first: int = 20000
    last: int = 29999

    def __post_init__(self) -> None:
        check_port(self.first, "first port of the range")
        check_port(self.last, "last port of the range")
        if self.last < self.first:
            raise ValueError(f"port range {self.first}-{self.last} runs backwards")

    @classmethod
    def parse(cls, text: str) -> PortRange:
        """'20000-29999' (a single port is a range of one)."""
        first, sep, last = text.strip().partition("-")
        if not first.isdigit() or (sep and not last.isdigit()):
            raise ValueError(f"{text!r} is not a port range; write FIRST-LAST, e.g. 20000-29999")
        return cls(int(first), int(last) if sep else int(first))

    def __len__(self) -> int:
        return self.last - self.first + 1

    def __str__(self) -> str:
        return f"{self.first}-{self.last}"


@dataclass(frozen=True)
class PortRequest:
    """One `ports` entry of a spec: [host_ip:][host_port:]guest_port[/protocol]."""

    guest_port: int
    host_port: int | None = None
    host_ip: str | None = None  # None: every address of the host
    protocol: Protocol = "tcp"

    def __post_init__(self) -> None:
        check_port(self.guest_port, "guest port")
        if self.host_port is not None:
            check_port(self.host_port, "host port")
        check_protocol(self.protocol)


class PortLike(TypingProtocol):
    """Anything shaped like a spec's port entry (agent.spec.fields.PortSpec is one)."""

    guest_port: int
    host_port: int | None
    host_ip: str | None
    protocol: str


def requests_from(entries: Iterable[PortLike]) -> tuple[PortRequest, ...]:
    """The spec's parsed `ports`, in order (the index is the `ports.N` of an error)."""
    return tuple(PortRequest(guest_port=e.guest_port, host_port=e.host_port, host_ip=e.host_ip,
                             protocol=check_protocol(e.protocol)) for e in entries)


@dataclass(frozen=True, order=True)
class PortBinding:
    """A published port: host_ip:host_port/protocol is forwarded to the VM's guest_port.

    `auto` says the agent chose host_port (the request had none), so a later activate with the
    same request keeps it; host_ip is ANY_ADDRESS for "every address of the host".
    """

    protocol: Protocol
    host_ip: str
    host_port: int
    guest_port: int
    auto: bool = False

    def __post_init__(self) -> None:
        check_protocol(self.protocol)
        check_ipv4(self.host_ip, "host address")
        check_port(self.host_port, "host port")
        check_port(self.guest_port, "guest port")

    @property
    def wildcard(self) -> bool:
        return self.host_ip == ANY_ADDRESS

    def overlaps(self, protocol: str, host_ip: str, host_port: int) -> bool:
        """Whether a socket or binding on host_ip:host_port/protocol would take this one's traffic."""
        if protocol != self.protocol or host_port != self.host_port:
            return False
        return self.wildcard or host_ip == ANY_ADDRESS or host_ip == self.host_ip

    def docker_port(self) -> str:
        """Cattle's `dockerPorts` form: '0.0.0.0:8080:80/tcp'."""
        return f"{self.host_ip}:{self.host_port}:{self.guest_port}/{self.protocol}"

    def to_json(self) -> dict[str, object]:
        return {"protocol": self.protocol, "hostIp": self.host_ip, "hostPort": self.host_port,
                "guestPort": self.guest_port, "auto": self.auto}

    @classmethod
    def from_json(cls, data: dict[str, object]) -> PortBinding:
        return cls(protocol=data["protocol"], host_ip=data["hostIp"], host_port=data["hostPort"],  # type: ignore[arg-type]
                   guest_port=data["guestPort"], auto=bool(data.get("auto", False)))  # type: ignore[arg-type]


def docker_ports(bindings: tuple[PortBinding, ...] | list[PortBinding]) -> list[str]:
    """The activate reply's `+fields.dockerPorts`: one 'hostIp:hostPort:guestPort/proto' each."""
    return [b.docker_port() for b in bindings]


def bindings_to_json(bindings: tuple[PortBinding, ...]) -> str:
    """Compact JSON for the domain metadata (ASCII only, so it survives XML as it is)."""
    return json.dumps([b.to_json() for b in bindings], sort_keys=True, separators=(",", ":"))


def bindings_from_json(text: str | None) -> tuple[PortBinding, ...]:
    """The metadata's JSON back; a domain written before ports existed has none."""
    if not text:
        return ()
    try:
        return tuple(PortBinding.from_json(item) for item in json.loads(text))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"published ports in the metadata are unreadable: {exc}") from None


@dataclass(frozen=True)
class PublishedVm:
    """What the nftables table forwards for one running VM: its bindings to address, via bridge.

    `address` is None while the guest has no DHCP lease yet: its bindings stay reserved (no other
    VM may take them) but nothing is forwarded until the address is known.
    """

    instance_uuid: str
    bindings: tuple[PortBinding, ...]
    address: str | None = None
    #: the host interface the guest sits behind (the libvirt network's bridge, e.g. virbr0)
    bridge: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "instance_uuid", str(uuid_module.UUID(self.instance_uuid)))
        if self.address is not None:
            object.__setattr__(self, "address", check_ipv4(self.address, "guest address"))
        if self.bridge is not None:
            check_ifname(self.bridge)

    @property
    def forwarded(self) -> bool:
        return self.address is not None and bool(self.bindings)
