"""What the host itself holds: its IPv4 addresses, its listening sockets, a bridge's networks.

Read with psutil (already a dependency for the ping's host facts); everything else in this
package is pure and takes these as inputs.
"""

from __future__ import annotations

import ipaddress
import socket

import psutil

from drivers.ports.allocate import HostView, Listener
from drivers.ports.model import ANY_ADDRESS


def _ipv4_of(address: str) -> str | None:
    """The IPv4 address a socket bound to `address` receives on; None when it gets no IPv4."""
    ip = ipaddress.ip_address(address.split("%")[0])
    if ip.version == 4:
        return str(ip)
    if ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    # '::' without IPV6_V6ONLY also takes IPv4 (Linux's default); treat it as taking every address
    return ANY_ADDRESS if ip.is_unspecified else None


def _process(pid: int | None) -> str | None:
    if not pid:
        return None
    try:
        return f"{psutil.Process(pid).name()}, pid {pid}"
    except psutil.Error:
        return f"pid {pid}"


def listeners() -> tuple[Listener, ...]:
    """Listening TCP sockets and bound UDP sockets (SCTP sockets are not seen)."""
    found: list[Listener] = []
    for kind in ("tcp", "udp"):
        for conn in psutil.net_connections(kind=kind):
            if not conn.laddr or (kind == "tcp" and conn.status != psutil.CONN_LISTEN):
                continue
            address = _ipv4_of(conn.laddr.ip)
            if address is not None:
                found.append(Listener(kind, address, conn.laddr.port, _process(conn.pid)))
    return tuple(found)


def addresses() -> frozenset[str]:
    """Every IPv4 address configured on the host's interfaces."""
    return frozenset(
        a.address for addrs in psutil.net_if_addrs().values() for a in addrs if a.family == socket.AF_INET
    )


def host_view() -> HostView:
    return HostView(addresses=addresses(), listeners=listeners())


def bridge_networks(bridge: str) -> tuple[ipaddress.IPv4Network, ...]:
    """The IPv4 networks on `bridge` (192.168.122.0/24 for libvirt's default network)."""
    networks = []
    for a in psutil.net_if_addrs().get(bridge, []):
        if a.family == socket.AF_INET and a.netmask:
            networks.append(ipaddress.IPv4Network(f"{a.address}/{a.netmask}", strict=False))
    return tuple(networks)
