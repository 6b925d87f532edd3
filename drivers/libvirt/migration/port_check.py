"""Published ports, checked on the destination before anything moves.

A VM's published ports travel in its metadata, and the destination agent publishes them when the
VM arrives. If another herdsman VM there already publishes the same host port, both would claim
it and one would silently not be reached; so such a migration is refused up front, naming the
port and the VM holding it. The check reads the destination's VMs through its libvirtd (their
metadata), so what it cannot see stays the destination agent's business: a port held there by a
process that is not a VM, and whether a binding to one address exists there (a VM published on
a host address keeps that address, which the destination may not have).
"""

from __future__ import annotations

from collections.abc import Iterable

import libvirt

from drivers.libvirt import inventory
from drivers.ports.model import ANY_ADDRESS, PortBinding


def clash(a: PortBinding, b: PortBinding) -> bool:
    """Both forward the same host port (an any-address binding covers every address)."""
    return (a.protocol == b.protocol and a.host_port == b.host_port
            and (a.host_ip == b.host_ip or ANY_ADDRESS in (a.host_ip, b.host_ip)))


def conflicts(mine: Iterable[PortBinding], theirs: dict[str, tuple[PortBinding, ...]]) -> list[str]:
    """What stands in the way of `mine` among other VMs' bindings (uuid → bindings)."""
    problems = []
    for binding in mine:
        for other, bindings in sorted(theirs.items()):
            if any(clash(binding, b) for b in bindings):
                problems.append(f"host port {binding.host_ip}:{binding.host_port}/{binding.protocol} is "
                                f"published there by VM {other}")
    return problems


def destination_bindings(dst: libvirt.virConnect, uuid: str) -> dict[str, tuple[PortBinding, ...]]:
    """Blocking: the published ports of every herdsman VM on the destination but `uuid`."""
    found = {}
    for dom in dst.listAllDomains(0):
        other = dom.UUIDString()
        if other == uuid:
            continue
        try:
            meta = inventory.read_metadata(dom)
        except libvirt.libvirtError:
            continue  # gone meanwhile
        if meta is not None and meta.ports:
            found[other] = meta.ports
    return found
