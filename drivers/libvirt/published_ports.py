"""A VM's `ports` in the libvirt driver: host ports chosen at activate, the table kept in step.

drivers/ports does the host's side (PortPublisher: allocation, nftables, the FORWARD rule) and
drivers.libvirt.port_sync decides when the table is rewritten; this is what the driver holds.
Its hooks, each a line in driver.py:

    ensure_vm   async with ports.allocating(uuid):        reservations end with the operation
                    bindings = await ports.allocate(spec, registry, session=...)   → the metadata
    remove_vm   ports.request()
    lifecycle   ports.on_lifecycle(uuid, event)
    connect     ports.connected(conn)                     after adoption
    start/close ports.start(...), await ports.close()    (close never clears the table)

Only a local qemu:///system publishes with nftables (port_publisher()). Under qemu:///session
the VM's bindings are qemu's hostfwd ones (session_bindings), reported the same way; under any
other URI (a remote host, the test driver) `ports` stay validated and stored, with no effect.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncIterator, Mapping
from urllib.parse import urlsplit

import libvirt

from agent.spec.vm import VirtualMachine
from drivers.base import DriverError
from drivers.libvirt import threads
from drivers.libvirt.addresses import AddressBook
from drivers.libvirt.domxml.model import AgentMetadata
from drivers.libvirt.port_sync import REPAIR_EVERY, PortSync, Registry, StateOf
from drivers.ports.allocate import PortConflict
from drivers.ports.model import PortBinding, PortRange, requests_from
from drivers.ports.publisher import PortPublisher
from drivers.ports.ruleset import TableConfig

_NO_FORWARDING = {
    "bridge": "networkMode bridge puts the VM on a host bridge with an address of its own on that "
              "network: reach it there, or use networkMode managed to publish ports",
    "none": "networkMode none gives the VM no network to forward to",
}


def publishes_ports(uri: str) -> bool:
    """Whether this agent publishes ports with nftables: only for qemu:///system on this host
    (the table is this host's; session mode keeps qemu's hostfwd)."""
    parts = urlsplit(uri)
    return parts.scheme in ("qemu", "qemu+unix") and not parts.hostname and parts.path == "/system"


def port_publisher(uri: str, *, port_range: str, table: str, logger: logging.Logger | None = None) -> PortPublisher | None:
    """The agent's PortPublisher for this libvirt URI, or None where ports are not published."""
    if not publishes_ports(uri):
        return None
    return PortPublisher(table=TableConfig(name=table), port_range=PortRange.parse(port_range),
                         logger=logger or logging.getLogger("herdsman.ports"))


def session_bindings(spec: VirtualMachine) -> tuple[PortBinding, ...]:
    """What qemu's user-mode networking forwards under qemu:///session (the renderer's rule:
    127.0.0.1 unless a host address is given, the guest port when no host port is)."""
    if spec.network_mode == "none":
        return ()
    return tuple(PortBinding(protocol=p.protocol, host_ip=p.host_ip or "127.0.0.1",  # type: ignore[arg-type]
                             host_port=p.host_port or p.guest_port, guest_port=p.guest_port)
                 for p in spec.port_specs if p.protocol in ("tcp", "udp") and ":" not in (p.host_ip or ""))


class PublishedPorts:
    def __init__(self, publisher: PortPublisher | None, *, network: str | None, logger: logging.Logger,
                 repair_every: float = REPAIR_EVERY) -> None:
        self.publisher = publisher
        self.sync = PortSync(publisher, network=network, logger=logger, repair_every=repair_every) \
            if publisher is not None else None
        self._log = logger
        #: bindings handed out by an activate still in progress (not in the registry yet), and
        #: whether that VM had ports before (its rules change either way)
        self._pending: dict[str, tuple[tuple[PortBinding, ...], bool]] = {}
        self._lock = asyncio.Lock()

    @property
    def enabled(self) -> bool:
        return self.publisher is not None

    # -- activate -----------------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def allocating(self, instance_uuid: str) -> AsyncIterator[None]:
        """Around an activate: the VM's new bindings count as taken until the operation ends
        (by then the registry holds them, or it failed and they are free again)."""
        try:
            yield
        finally:
            bindings, had = self._pending.pop(instance_uuid, ((), False))
            if bindings or had:
                self.request()

    async def allocate(self, spec: VirtualMachine, registry: Mapping[str, AgentMetadata], *,
                       session: bool) -> tuple[PortBinding, ...]:
        """The VM's bindings for its metadata; DriverError naming `ports.N` when one cannot be
        had. Two activates at once never get one port: allocations run one at a time, and each
        sees the registry plus every allocation still on its way there."""
        if self.publisher is None:
            return session_bindings(spec) if session else ()
        uuid = spec.instance_uuid
        current = registry.get(uuid)
        previous = current.ports if current is not None else ()
        if not spec.ports:
            self._pending[uuid] = ((), bool(previous))
            return ()
        if spec.network_mode in _NO_FORWARDING:
            raise DriverError(f"ports: {_NO_FORWARDING[spec.network_mode]}")
        requests = requests_from(spec.port_specs)
        async with self._lock:
            others: dict[str, tuple[PortBinding, ...]] = {u: m.ports for u, m in registry.items() if u != uuid and m.ports}
            for other, (bindings, _) in self._pending.items():
                if other != uuid and bindings:
                    others[other] = others.get(other, ()) + bindings
            try:
                bindings = await threads.call(functools.partial(self.publisher.allocate, uuid, requests, others=others,
                                                                previous=previous), what="the host port allocation")
            except PortConflict as exc:
                raise DriverError(str(exc)) from None
            self._pending[uuid] = (bindings, bool(previous))
        return bindings

    # -- keeping the table in step (drivers.libvirt.port_sync) -------------------------------------
    def start(self, *, registry: Registry, state: StateOf, addresses: AddressBook) -> None:
        if self.sync is not None:
            self.sync.start(registry=registry, state=state, addresses=addresses)
            addresses.on_change = self.sync.address_changed

    def connected(self, conn: libvirt.virConnect) -> None:
        if self.sync is not None:
            self.sync.connected(conn)

    def request(self) -> None:
        if self.sync is not None:
            self.sync.request()

    def on_lifecycle(self, instance_uuid: str, event: str) -> None:
        if self.sync is not None:
            self.sync.on_lifecycle(instance_uuid, event)

    async def close(self) -> None:
        if self.sync is not None:
            await self.sync.close()
