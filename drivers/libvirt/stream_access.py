"""What the stream server reaches through the driver: consoles, VNC, guest commands, addresses.

The agent's stream handlers (agent/streams/) speak only drivers.base (ConsoleViewer,
GuestCommand, GuestNetwork); this module is the libvirt side of that seam, so a VM's streams
follow it wherever the driver finds it, and another driver could serve them.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol
from xml.etree import ElementTree

import libvirt
from lxml import etree

from drivers.base import (
    ConsoleViewer,
    DriverError,
    GuestAgentUnavailable,
    GuestCommand,
    GuestNetwork,
    IpAddress,
    IpNetwork,
    NotFound,
)
from drivers.libvirt import threads
from drivers.libvirt.console_stream import ConsoleHubs
from drivers.libvirt.guest_agent import AGENT_NOT_RUNNING, GuestAgent, GuestProcess, guest_has_pty


class Domains(Protocol):
    async def domain(self, instance_uuid: str) -> libvirt.virDomain: ...
    def console_log_path(self, instance_uuid: str) -> Path | None: ...


class StreamAccess:
    """The libvirt side of console, VNC, exec and proxy streams for one driver."""

    def __init__(self, domains: Domains, *, network: str | None = None, vnc_skip_auth: bool = True,
                 agent_timeout: int = 10, logger: logging.Logger | None = None) -> None:
        self._log = logger or logging.getLogger("herdsman.streams")
        self.network = network
        self.vnc_skip_auth = vnc_skip_auth
        self.agent_timeout = agent_timeout
        self.hubs = ConsoleHubs(domains, logger=self._log)

    def close(self) -> None:
        self.hubs.close()

    async def attach_console(self, instance_uuid: str) -> ConsoleViewer:
        return await self.hubs.attach(instance_uuid)

    async def open_graphics(self, dom: libvirt.virDomain) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A byte stream to the VM's VNC server: a libvirt-passed socket, else TCP to its listener.

        With ``vnc_skip_auth`` qemu skips the VNC password for the passed socket: the caller's
        verified token already authorised the user.
        """
        if not await threads.call(dom.isActive):
            raise DriverError("the VM is not running")
        flags = libvirt.VIR_DOMAIN_OPEN_GRAPHICS_SKIPAUTH if self.vnc_skip_auth else 0
        try:
            fd = await threads.call(dom.openGraphicsFD, 0, flags)
        except libvirt.libvirtError as exc:
            self._log.info("openGraphicsFD failed (%s); connecting over TCP", exc.get_error_message())
            host, port = vnc_address(await threads.call(dom.XMLDesc, 0))
            return await asyncio.open_connection(host, port)
        return await asyncio.open_connection(sock=socket.socket(fileno=fd))

    async def guest_exec(self, dom: libvirt.virDomain, argv: Sequence[str], *, stdin: bool,
                         tty: bool) -> GuestCommand:
        """Start ``argv`` in the guest through its agent (DriverError with the user's reason)."""
        agent = GuestAgent(dom, timeout=self.agent_timeout)
        try:
            if not await threads.call(dom.isActive):
                raise DriverError("the VM is not running")
            if await agent.connected() is False:
                raise GuestAgentUnavailable(AGENT_NOT_RUNNING)
        except libvirt.libvirtError as exc:
            raise DriverError(f"libvirt: {exc.get_error_message() or exc}") from None
        pty = tty and await guest_has_pty(agent)
        process = GuestProcess(agent, argv, stdin=stdin, merge_stderr=tty, pty=pty)
        await process.start()
        return process

    def managed_network(self, dom: libvirt.virDomain, primary: str | None) -> GuestNetwork:
        """Blocking: the VM's primary address with its managed network's subnets."""
        if not self.network:
            return GuestNetwork(primary=primary)
        try:
            xml = dom.connect().networkLookupByName(self.network).XMLDesc(0)
        except libvirt.libvirtError as exc:  # no such network: only the primary address counts
            self._log.debug("managed network unknown", extra={"network": self.network, "error": str(exc)})
            return GuestNetwork(primary=primary)
        ranges, hosts = network_ranges(xml)
        return GuestNetwork(primary=primary, subnets=tuple(ranges), host_addresses=frozenset(hosts))


def network_ranges(network_xml: str) -> tuple[list[IpNetwork], set[IpAddress]]:
    """The subnets of a libvirt network and the host's own addresses on them."""
    root = ElementTree.fromstring(network_xml)
    ranges: list[IpNetwork] = []
    hosts: set[IpAddress] = set()
    for ip in root.findall("ip"):
        address = ip.get("address")
        if not address:
            continue
        mask = ip.get("prefix") or ip.get("netmask")
        ranges.append(ipaddress.ip_network(f"{address}/{mask}" if mask else address, strict=False))
        hosts.add(ipaddress.ip_address(address))
    return ranges, hosts


def vnc_address(live_xml: str) -> tuple[str, int]:
    """The VNC listener of a running domain from its live XML (wildcards mean loopback)."""
    root = etree.fromstring(live_xml.encode())
    graphics = root.find("devices/graphics[@type='vnc']")
    if graphics is None:
        raise NotFound("this VM has no VNC display")
    port = int(graphics.get("port", "-1"))
    if port <= 0:
        raise DriverError("the VM's VNC display has no TCP port")
    listen = graphics.find("listen[@type='address']")
    host = (listen.get("address") if listen is not None else None) or graphics.get("listen") or "127.0.0.1"
    return ("127.0.0.1" if host in ("0.0.0.0", "::") else host), port
