"""The test hosts' network: one LAN per environment, all on this machine.

    root namespace                 <env>-lan                      <env>-a / <env>-b
    hmh<S> 10.77.S.254/24 ──veth── root ┐
                                        lan (bridge) 10.77.S.253 ─┬─ to-a ──veth── uplink ┐ br0 10.77.S.1/24
                                        dnsmasq: DHCP .100-.199   └─ to-b ──veth── uplink ┘ br0 10.77.S.2/24

Each host's `br0` (the bridge the guests attach to, same name on every host, as on real
hosts) carries the host's address and has the host's uplink as a port, so a guest's NIC works
on whichever host it runs, and after a migration QEMU's announce moves the guest's MAC to the
other uplink. The LAN namespace is the switch: cutting a host's port there (`set_uplink`) is a
network failure for that host only. The root namespace joins the LAN through one veth, so a
controller double listening on the root address is reachable from every host, and tests in
the root namespace reach hosts and guests directly. Slot S keeps parallel environments apart.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass

SUBNET_PREFIX = "10.77"
ROOT_LAST, LAN_LAST = 254, 253
DHCP_FIRST, DHCP_LAST = 100, 199


@dataclass(frozen=True)
class Lan:
    slot: int

    @property
    def prefix(self) -> str:
        return f"{SUBNET_PREFIX}.{self.slot}"

    @property
    def subnet(self) -> str:
        return f"{self.prefix}.0/24"

    @property
    def root_address(self) -> str:
        """Where the root namespace sits on the LAN (servers the hosts must reach bind here)."""
        return f"{self.prefix}.{ROOT_LAST}"

    @property
    def switch_address(self) -> str:
        return f"{self.prefix}.{LAN_LAST}"

    @property
    def dhcp_range(self) -> tuple[str, str]:
        return f"{self.prefix}.{DHCP_FIRST}", f"{self.prefix}.{DHCP_LAST}"

    def host_address(self, index: int) -> str:
        return f"{self.prefix}.{index + 1}"

    @property
    def root_link(self) -> str:
        return f"hmh{self.slot}"

    def netns(self, role: str) -> str:
        return f"hmh{self.slot}-{role}"


def port(role: str) -> str:
    """The switch port a host's uplink is plugged into."""
    return f"to-{role}"


def ip(*args: str) -> None:
    result = subprocess.run(["ip", *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")


def create(lan: Lan, hosts: list[str], bridge: str) -> None:
    """Make the LAN namespace, the root link and one namespace per host (see module doc)."""
    sw = lan.netns("lan")
    ip("netns", "add", sw)
    ip("-n", sw, "link", "set", "lo", "up")
    ip("-n", sw, "link", "add", "lan", "type", "bridge")
    ip("-n", sw, "addr", "add", f"{lan.switch_address}/24", "dev", "lan")
    ip("-n", sw, "link", "set", "lan", "up")
    ip("link", "add", lan.root_link, "type", "veth", "peer", "name", "root", "netns", sw)
    ip("-n", sw, "link", "set", "root", "master", "lan", "up")
    ip("addr", "add", f"{lan.root_address}/24", "dev", lan.root_link)
    ip("link", "set", lan.root_link, "up")
    for index, role in enumerate(hosts):
        ns = lan.netns(role)
        ip("netns", "add", ns)
        ip("-n", ns, "link", "set", "lo", "up")
        ip("-n", ns, "link", "add", bridge, "type", "bridge")
        ip("-n", sw, "link", "add", "name", port(role), "type", "veth", "peer", "name", "uplink", "netns", ns)
        ip("-n", sw, "link", "set", "dev", port(role), "master", "lan", "up")
        ip("-n", ns, "link", "set", "uplink", "master", bridge, "up")
        ip("-n", ns, "addr", "add", f"{lan.host_address(index)}/24", "dev", bridge)
        ip("-n", ns, "link", "set", bridge, "up")


def set_uplink(lan: Lan, role: str, up: bool) -> None:
    """Plug or unplug a host's cable at the switch (a network failure for that host only)."""
    ip("-n", lan.netns("lan"), "link", "set", "dev", port(role), "up" if up else "down")


def destroy(lan: Lan, roles: list[str]) -> None:
    """Delete the namespaces and the root link; whatever is already gone is skipped."""
    existing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    names = {line.split()[0] for line in existing.splitlines() if line.strip()}
    for role in [*roles, "lan"]:
        if lan.netns(role) in names:
            ip("netns", "del", lan.netns(role))
    if subprocess.run(["ip", "link", "show", lan.root_link], capture_output=True).returncode == 0:
        ip("link", "del", lan.root_link)


def root_links_in_use() -> set[int]:
    """Slots whose root link exists (an environment is using or leaked them)."""
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    slots = set()
    for line in out.splitlines():
        name = line.split(":")[1].strip().split("@")[0]
        if name.startswith("hmh") and name[3:].isdigit():
            slots.add(int(name[3:]))
    return slots
