"""What the host itself holds: its IPv4 addresses, its listening sockets, a bridge's networks.

Read from /proc/net and with psutil (already a dependency for the ping's host facts);
everything else in this package is pure and takes these as inputs.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from pathlib import Path

import psutil

from drivers.ports.allocate import HostView, Listener
from drivers.ports.model import ANY_ADDRESS

PROC_NET = Path("/proc/net")


def _ipv4_of(address: str) -> str | None:
    """The IPv4 address a socket bound to `address` receives on; None when it gets no IPv4."""
    ip = ipaddress.ip_address(address.split("%")[0])
    if ip.version == 4:
        return str(ip)
    if ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    # '::' without IPV6_V6ONLY also takes IPv4 (Linux's default); treat it as taking every address
    return ANY_ADDRESS if ip.is_unspecified else None


_LISTEN = 0x0A  # TCP_LISTEN in /proc/net/tcp's "st" column


def _hex_address(text: str) -> str:
    """/proc/net's address: 32-bit words in host byte order (little-endian on x86 and arm64)."""
    raw = bytes.fromhex(text)
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    return str(ipaddress.ip_address(words))


def _sockets(protocol: str, root: Path) -> list[tuple[str, int, int]]:
    """(address, port, inode) of the listening (tcp) or bound (udp) sockets of /proc/net/<protocol>{,6}."""
    found = []
    for name in (protocol, f"{protocol}6"):
        try:
            lines = (root / name).read_text().splitlines()[1:]
        except FileNotFoundError:
            continue  # no IPv6 on this host
        for line in lines:
            fields = line.split()
            local, state, inode = fields[1], int(fields[3], 16), int(fields[9])
            if protocol == "tcp" and state != _LISTEN:
                continue
            address, port = local.rsplit(":", 1)
            found.append((_hex_address(address), int(port, 16), inode))
    return found


def listeners(*, root: Path = PROC_NET) -> tuple[Listener, ...]:
    """Listening TCP sockets and bound UDP sockets (SCTP sockets are not seen).

    Read from /proc/net directly: psutil.net_connections also maps every socket to its process
    by scanning every process's file descriptors (30 ms here), which only a refusal needs
    (owner() does it then, for one socket).
    """
    found = []
    for protocol in ("tcp", "udp"):
        for address, port, inode in _sockets(protocol, root):
            ipv4 = _ipv4_of(address)
            if ipv4 is not None and port:
                found.append(Listener(protocol, ipv4, port, inode=inode))
    return tuple(found)


def owner(listener: Listener) -> str | None:
    """'sshd, pid 612' for the process holding the listener's socket, when it can be found."""
    if not listener.inode:
        return None
    target = f"socket:[{listener.inode}]"
    for proc in psutil.process_iter(["pid", "name"]):
        try:
            fds = os.listdir(f"/proc/{proc.pid}/fd")
            if any(os.readlink(f"/proc/{proc.pid}/fd/{fd}") == target for fd in fds):
                return f"{proc.info['name']}, pid {proc.pid}"
        except OSError:
            continue  # gone, or not ours to read
    return None


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
