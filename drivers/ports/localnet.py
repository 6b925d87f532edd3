"""route_localnet on the bridges guests sit behind, so 127.0.0.1:PORT on the host can be DNATed.

Linux refuses to route a packet with a 127.0.0.0/8 source out of a non-loopback interface
unless that interface has net.ipv4.conf.<if>.route_localnet=1. The same switch would let a
guest on the bridge send packets to the host's 127.0.0.1, so the table's `guard` chain drops
those on every bridge listed in its `localnet_bridges` set, and the switch is turned off again
when no binding needs it. (docker does the same with --userland-proxy=false.)
"""

from __future__ import annotations

from pathlib import Path

from drivers.ports.model import check_ifname

SYSCTL_ROOT = Path("/proc/sys/net/ipv4/conf")


def set_route_localnet(bridge: str, on: bool, *, root: Path = SYSCTL_ROOT) -> bool:
    """Turn the switch on or off; False when the interface does not exist (nothing to do)."""
    path = root / check_ifname(bridge) / "route_localnet"
    try:
        current = path.read_text().strip()
        wanted = "1" if on else "0"
        if current != wanted:
            path.write_text(wanted)
    except FileNotFoundError:
        return False
    return True


def route_localnet(bridge: str, *, root: Path = SYSCTL_ROOT) -> bool | None:
    """The switch's state, or None when the interface does not exist."""
    try:
        return (root / check_ifname(bridge) / "route_localnet").read_text().strip() == "1"
    except FileNotFoundError:
        return None
