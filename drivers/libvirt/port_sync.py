"""Keeps the published-ports table in step with the VMs: one coalesced sync at a time, off the loop.

A sync rewrites the whole table from every active VM's bindings (drivers.ports.PortPublisher),
so it is the same operation whatever caused it, and bursts collapse into one: a request while a
sync runs means one more afterwards, never one per request. What asks for one:

- the driver: after adoption on every (re)connect (which rebuilds the table after an agent
  restart), after an activate or a remove, on a VM's start, stop, crash or removal;
- the address book, when it learns or changes a VM's address (guests get theirs by DHCP
  seconds after they start);
- libvirt, when the managed network starts (a recreated bridge has lost route_localnet);
- a timer, about once a minute, to repair what others flushed (`nft flush ruleset`,
  a firewall reload). Idle when nothing is published.

Nothing is synced before the first adoption: the registry would still be empty and the sync
would wipe the rules of every running VM. A VM whose address is not known yet keeps its ports
reserved and forwards nothing; one whose lookup fails for a moment keeps its last address
while it runs, so a hiccup never cuts its traffic. Closing does not clear: the rules keep
serving the running VMs while the agent is away.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import libvirt

from drivers.base import DriverError
from drivers.libvirt import threads
from drivers.libvirt.domxml.model import AgentMetadata
from drivers.ports.forward import ForwardRuleError
from drivers.ports.model import PublishedVm
from drivers.ports.nft import NftError
from drivers.ports.publisher import PortPublisher, SyncResult

#: Seconds between repairs when nothing asked for a sync.
REPAIR_EVERY = 60.0
#: Seconds before a failed sync is tried again.
RETRY_AFTER = 5.0
#: Lifecycle events after which what the table forwards may have changed.
SYNC_ON = frozenset({"started", "stopped", "crashed", "undefined"})
#: A VM in these states forwards nothing (its ports stay reserved while it is defined).
_INACTIVE = frozenset({"stopped"})

Registry = Callable[[], Mapping[str, AgentMetadata]]
StateOf = Callable[[str], str | None]


class Addresses(Protocol):
    """Where VMs' addresses come from (drivers.libvirt.addresses.AddressBook)."""

    def get(self, uuid: str) -> str | None: ...
    def refresh(self, dom: libvirt.virDomain) -> str | None: ...


class PortSync:
    def __init__(self, publisher: PortPublisher, *, network: str | None, logger: logging.Logger,
                 repair_every: float = REPAIR_EVERY, retry_after: float = RETRY_AFTER) -> None:
        self.publisher = publisher
        self.network = network
        self.repair_every = repair_every
        self.retry_after = retry_after
        self._log = logger
        self._wanted = asyncio.Event()
        self._ready = asyncio.Event()  # set after the first adoption
        self._loop: asyncio.AbstractEventLoop | None = None
        self._registry: Registry = dict
        self._state: StateOf = lambda _uuid: None
        self._addresses: Addresses | None = None
        self._last_address: dict[str, str] = {}
        self._bridge: str | None = None
        self._watch: tuple[libvirt.virConnect, int] | None = None  # network events: (connection, callback id)
        self._tasks: dict[str, asyncio.Task[Any]] = {}
        self._failed = False
        self._signature: tuple[PublishedVm, ...] | None = None  # what the last successful sync forwarded
        #: the last successful sync's result and how many have run (logs, tests)
        self.last: SyncResult | None = None
        self.count = 0

    # -- wiring ------------------------------------------------------------------------------------
    def start(self, *, registry: Registry, state: StateOf, addresses: Addresses) -> None:
        """Begin (on the loop): the sync task waits for the first connected() before it syncs."""
        self._loop = asyncio.get_running_loop()
        self._registry, self._state, self._addresses = registry, state, addresses
        self._spawn("sync", self._run())

    async def close(self) -> None:
        """Stop syncing and stop listening to libvirt. The table stays as it is."""
        for task in self._tasks.values():
            task.cancel()
        watch, self._watch = self._watch, None
        if watch is not None:
            await self._let_go(*watch)

    def request(self) -> None:
        """Ask for a sync (coalesced with every other request until it runs)."""
        self._wanted.set()

    def on_lifecycle(self, uuid: str, event: str) -> None:
        """A lifecycle event of a domain, before the driver acts on it (on the loop)."""
        if event in SYNC_ON:
            meta = self._registry().get(uuid)
            if meta is not None and meta.ports:
                self.request()

    def address_changed(self, uuid: str, address: str | None) -> None:
        """From the address book, on whichever thread looked the address up."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            threads.on_loop(loop, self._address_changed, uuid)

    def _address_changed(self, uuid: str) -> None:
        meta = self._registry().get(uuid)
        if meta is not None and meta.ports:
            self.request()

    def connected(self, conn: libvirt.virConnect) -> None:
        """After adoption on a (re)connect: listen to the managed network, read its bridge and
        the addresses of running VMs with ports, then sync."""
        self._spawn("connect", self._on_connect(conn))

    # -- after a connect ---------------------------------------------------------------------------
    async def _on_connect(self, conn: libvirt.virConnect) -> None:
        wanted = [u for u, m in self._registry().items() if m.ports and self._state(u) not in (None, *_INACTIVE)]
        old, self._watch = self._watch, None
        if old is not None:
            self._spawn("unwatch", self._let_go(*old))
        steps: list[tuple[str, Callable[[], Any]]] = [
            ("listening to the managed network's events", lambda: threads.call(
                self._watch_network, conn, timeout=30, what="network event registration")),
            ("reading the managed network's bridge", lambda: self._read_bridge(conn)),
            ("looking up the addresses of VMs with published ports", lambda: threads.call(
                self._learn_addresses, conn, wanted, lane="query", timeout=60, what="VM addresses")),
        ]
        for what, step in steps:
            try:
                await step()
            except (libvirt.libvirtError, DriverError) as exc:  # the sync still runs; what is known is used
                self._log.warning("published ports: %s after connecting failed: %s", what, exc)
        self._ready.set()
        self.request()

    def _watch_network(self, conn: libvirt.virConnect) -> None:
        """Blocking: register for the managed network's lifecycle events on this connection."""
        callback = conn.networkEventRegisterAny(None, libvirt.VIR_NETWORK_EVENT_ID_LIFECYCLE, self._on_network, None)
        self._watch = (conn, callback)

    async def _let_go(self, conn: libvirt.virConnect, callback: int) -> None:
        """Deregister from an earlier connection, on the side: it may hang, and must not hold
        up the new one."""
        try:
            await threads.call(self._unwatch, conn, callback, timeout=10, what="network event deregistration")
        except DriverError as exc:
            self._log.debug("network event deregistration: %s", exc)

    def _unwatch(self, conn: libvirt.virConnect, callback: int) -> None:
        try:
            conn.networkEventDeregisterAny(callback)
        except libvirt.libvirtError as exc:  # a connection that died: its callbacks went with it
            self._log.debug("network event deregistration: %s", exc)

    def _on_network(self, conn: libvirt.virConnect, net: libvirt.virNetwork, event: int, detail: int,
                    opaque: object) -> None:
        """On libvirt's event thread: hand a start of the managed network to the loop."""
        if event == libvirt.VIR_NETWORK_EVENT_STARTED and net.name() == self.network and self._loop is not None:
            threads.on_loop(self._loop, self._network_started, conn)

    def _network_started(self, conn: libvirt.virConnect) -> None:
        if self._watch is not None and self._watch[0] is conn:
            self._spawn("network", self._after_network_start(conn))

    async def _after_network_start(self, conn: libvirt.virConnect) -> None:
        try:
            await self._read_bridge(conn)
        except (libvirt.libvirtError, DriverError) as exc:
            self._log.warning("published ports: reading the restarted network failed: %s", exc)
        self._log.info("managed network started; published ports are written again", extra={"network": self.network})
        self.request()

    async def _read_bridge(self, conn: libvirt.virConnect) -> None:
        if self.network:
            self._bridge = await threads.call(_bridge_of, conn, self.network, lane="query", timeout=30,
                                              what="the managed network's bridge")

    def _learn_addresses(self, conn: libvirt.virConnect, uuids: list[str]) -> None:
        """Blocking: look up the leases of running VMs with ports now, so the first sync after an
        agent restart forwards what the table forwarded before instead of waiting for the book."""
        assert self._addresses is not None
        for uuid in uuids:
            try:
                self._addresses.refresh(conn.lookupByUUIDString(uuid))
            except libvirt.libvirtError:
                continue  # undefined meanwhile: the next sync leaves it out

    # -- the sync loop -----------------------------------------------------------------------------
    async def _run(self) -> None:
        await self._ready.wait()
        while True:
            wait = self.retry_after if self._failed else self.repair_every
            repair = False
            try:
                await asyncio.wait_for(self._wanted.wait(), wait)
            except TimeoutError:
                repair = True
            self._wanted.clear()
            vms = self.published()
            if repair and not self._failed and not any(vm.forwarded for vm in vms) and \
                    self._signature is not None and not any(vm.forwarded for vm in self._signature):
                continue  # nothing published before or now: nothing to repair
            await self.sync_now(vms)

    def published(self) -> tuple[PublishedVm, ...]:
        """What the table must forward now: every active VM with ports, at its address."""
        vms = []
        active = set()
        for uuid, meta in self._registry().items():
            if not meta.ports or self._state(uuid) in (None, *_INACTIVE):
                continue
            active.add(uuid)
            address = (self._addresses.get(uuid) if self._addresses else None) or self._last_address.get(uuid)
            if address is not None:
                self._last_address[uuid] = address
            try:
                vms.append(PublishedVm(uuid, meta.ports, address, self._bridge))
            except ValueError as exc:  # a hand-edited domain: its ports are left out, the rest go on
                self._log.warning("published ports of a VM left out: %s", exc, extra={"uuid": uuid})
        for uuid in set(self._last_address) - active:
            del self._last_address[uuid]
        return tuple(sorted(vms, key=lambda vm: vm.instance_uuid))

    async def sync_now(self, vms: tuple[PublishedVm, ...] | None = None) -> SyncResult | None:
        """One sync on a worker thread; a failure is logged and retried after retry_after."""
        vms = self.published() if vms is None else vms
        started = time.monotonic()
        try:
            result = await threads.call(functools.partial(self.publisher.sync, vms), what="the published ports sync")
        except (NftError, ForwardRuleError, OSError, ValueError, DriverError) as exc:
            self._failed = True
            self._log.warning("published ports not synced, retrying in %g s: %s", self.retry_after, exc)
            return None
        self._failed = False
        changed = vms != self._signature
        self._signature, self.last = vms, result
        self.count += 1
        self._log.log(logging.INFO if changed else logging.DEBUG, "published ports synced", extra={
            "vms": len(vms), "forwarded": result.forwarded, "forwardRule": result.forward_rule,
            "seconds": round(time.monotonic() - started, 3)})
        return result

    def _spawn(self, name: str, coro: Any) -> None:
        """One task per name: a newer one (a reconnect) replaces one still running."""
        previous = self._tasks.get(name)
        if previous is not None and not previous.done():
            previous.cancel()
        self._tasks[name] = asyncio.get_running_loop().create_task(coro, name=f"ports-{name}")


def _bridge_of(conn: libvirt.virConnect, network: str) -> str | None:
    """The managed network's bridge (virbr0), None when the network does not exist."""
    try:
        return conn.networkLookupByName(network).bridgeName()
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_NETWORK:
            return None
        raise
