"""Guests' IP addresses, learnt from libvirt's DHCP leases, off the ping path.

A ping must stay cheap at 1,000 VMs, so addresses are looked up in the background (a few VMs
per tick, unknown ones first) and a ping only reads the book.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from typing import Callable, Iterable

import libvirt

from drivers.libvirt import threads

#: Only libvirt's own DHCP leases: a guest-agent query is answered by the guest, slowly while it
#: boots under TCG, and each would hold a libvirt worker thread meanwhile. VMs on host bridges
#: (no libvirt DHCP) therefore report no address yet.
LEASES = (libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_LEASE,)


def first_ipv4(addresses: dict) -> str | None:
    """The first global IPv4 address of the first interface that has one."""
    for iface in addresses.values():
        for addr in iface.get("addrs") or []:
            if addr.get("type") != libvirt.VIR_IP_ADDR_TYPE_IPV4:
                continue
            ip = addr.get("addr")
            try:
                if ip and not ipaddress.ip_address(ip).is_loopback:
                    return ip
            except ValueError:
                continue
    return None


def lookup(dom: libvirt.virDomain, sources: tuple[int, ...] = LEASES) -> str | None:
    """The first IPv4 address any of `sources` knows."""
    for source in sources:
        try:
            found = first_ipv4(dom.interfaceAddresses(source, 0))
        except libvirt.libvirtError:
            continue  # no lease source (user networking, bridges) or no agent in the guest
        if found:
            return found
    return None


class AddressBook:
    def __init__(self, *, sources: tuple[int, ...] = LEASES, per_tick: int = 20, interval: float = 2.0,
                 max_age: float = 60.0, logger: logging.Logger | None = None,
                 on_change: Callable[[str, str | None], None] | None = None) -> None:
        """on_change(uuid, address): a lookup found another address than the book had; called
        on the thread that looked it up (a libvirt worker)."""
        self.sources = sources
        self.on_change = on_change
        self._known: dict[str, tuple[str | None, float]] = {}
        self.per_tick = per_tick
        self.interval = interval
        self.max_age = max_age
        self._log = logger or logging.getLogger("herdsman.addresses")

    def get(self, uuid: str) -> str | None:
        entry = self._known.get(uuid)
        return entry[0] if entry else None

    def forget(self, uuid: str) -> None:
        self._known.pop(uuid, None)

    def refresh(self, dom: libvirt.virDomain) -> str | None:
        """Blocking (a worker thread's job): look the address up now."""
        address = lookup(dom, self.sources) if dom.isActive() else None
        uuid = dom.UUIDString()
        before = self.get(uuid)
        self._known[uuid] = (address, time.monotonic())
        if address != before and self.on_change is not None:
            self.on_change(uuid, address)
        return address

    def _due(self, running: Iterable[str]) -> list[str]:
        now = time.monotonic()
        unknown, stale = [], []
        for uuid in running:
            entry = self._known.get(uuid)
            if entry is None or entry[0] is None:
                unknown.append(uuid)
            elif now - entry[1] > self.max_age:
                stale.append(uuid)
        return (unknown + stale)[: self.per_tick]

    async def run(self, running: Callable[[], list[libvirt.virDomain]]) -> None:
        """Forever: look up the addresses of a few running VMs per tick (``running`` blocks)."""
        while True:
            await asyncio.sleep(self.interval)
            try:
                domains = {d.UUIDString(): d for d in await threads.call(running, lane="query")}
            except Exception as exc:  # libvirt away: try again next tick
                self._log.debug("address refresh skipped", extra={"error": str(exc)})
                continue
            for uuid in list(self._known):
                if uuid not in domains:
                    self._known.pop(uuid)
            for uuid in self._due(domains):
                try:
                    await threads.call(self.refresh, domains[uuid], lane="query")
                except (libvirt.libvirtError, threads.LibvirtTimeout):
                    continue
