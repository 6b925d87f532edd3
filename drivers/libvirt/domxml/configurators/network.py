"""NICs for networkMode managed / bridge / none, and user-mode networking in session mode."""

from __future__ import annotations

import re

from drivers.libvirt.domxml.inputs import RenderError, RenderInput, derived_mac
from drivers.libvirt.domxml.model import Domain, Interface

#: PCI slot for the hand-made session NIC; libvirt fills the low slots itself.
SESSION_NIC_PCI_ADDR = "0x10"
_MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")


def _checked_mac(mac: str) -> str:
    """A controller's MAC, lower-cased; it reaches qemu's option parser in session mode."""
    normal = mac.lower()
    if not _MAC_RE.match(normal) or int(normal[:2], 16) & 1:
        raise RenderError(f"nics: {mac!r} is not a unicast MAC address like 52:54:00:12:34:56")
    return normal


def macs_for(inp: RenderInput) -> tuple[str, ...]:
    """The controller's MACs when it sent them, else one stable MAC derived from the uuid."""
    return tuple(_checked_mac(m) for m in inp.macs) or (derived_mac(inp.uuid, 0),)


def session_netdev_args(inp: RenderInput, mac: str) -> list[str]:
    """qemu arguments for a user-mode NIC with the spec's ports forwarded from the host.

    libvirt 9.0 has no <portForward> for user networking, so qemu's own hostfwd is used. Every
    value is an int or a validated address, so nothing user-written reaches qemu's option parser.
    """
    forwards = []
    for port in inp.spec.port_specs:
        if port.protocol not in ("tcp", "udp"):
            raise RenderError(f"ports: {port}: user-mode networking forwards only tcp and udp")
        host_ip = port.host_ip or "127.0.0.1"
        if ":" in host_ip:
            raise RenderError(f"ports: {port}: user-mode networking forwards only IPv4 host addresses")
        host_port = port.host_port or port.guest_port
        forwards.append(f",hostfwd={port.protocol}:{host_ip}:{host_port}-:{port.guest_port}")
    return [
        "-netdev", "user,id=hostnet0" + "".join(forwards),
        "-device", f"virtio-net-pci,netdev=hostnet0,mac={mac},addr={SESSION_NIC_PCI_ADDR}",
    ]


def configure(inp: RenderInput, dom: Domain) -> None:
    mode = inp.spec.network_mode
    if mode == "none":
        return
    macs = macs_for(inp)
    if inp.profile.session:
        # qemu:///session cannot use libvirt networks or bridges: one user-mode NIC, ports forwarded.
        dom.qemu_args.extend(session_netdev_args(inp, macs[0]))
        return
    for mac in macs:
        if mode == "managed":
            dom.interfaces.append(Interface(type="network", source=inp.policy.network, mac=mac))
        else:
            dom.interfaces.append(Interface(type="bridge", source=inp.policy.bridge, mac=mac))
