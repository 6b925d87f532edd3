"""The libvirt implementation of drivers.base.Hypervisor.

No libvirt call runs on the event loop: each goes to a libvirt worker thread through
drivers.libvirt.threads (bounded pool, a timeout per call), and libvirt's events arrive from its
own event thread, handed to the loop. The driver's state (which domains are ours, their
metadata) lives on the loop; operations on one VM are serialised by a per-VM lock, and waits
that can be long (a guest's ACPI shutdown) are asynchronous polls.

This class is the Hypervisor protocol's entry points and the state they share (the registry,
the per-VM locks); the work lives in the modules they call: event_routing (lifecycle events),
provision (volumes, seed, images), restart_ops, migration/service, stream_access, inventory,
domain_ops. It is long because the protocol is wide, not because it does much itself.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import uuid as uuid_module
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import libvirt

from agent.spec.migration import MigrateInput
from agent.spec.vm import VirtualMachine
from drivers.base import (
    ConsoleViewer,
    DriverError,
    GuestCommand,
    GuestNetwork,
    HostEvent,
    MigrationProgressCallback,
    MigrationReport,
    NotFound,
    Placement,
    Unavailable,
    VmRecord,
    VmSample,
)
from drivers.libvirt import domain_ops, host_setup, inventory, stats, threads
from drivers.libvirt.addresses import LEASES, AddressBook
from drivers.libvirt.capabilities import probe_host_profile
from drivers.libvirt.connection import LibvirtConnection, LibvirtUnavailable
from drivers.libvirt.domxml.builder import build_domain
from drivers.libvirt.domxml.inputs import HostPolicy, RenderInput
from drivers.libvirt.domxml.model import AgentMetadata
from drivers.libvirt.domxml.writer import to_xml
from drivers.libvirt.event_routing import EventRouter
from drivers.libvirt.host_dirs import HostDirError
from drivers.libvirt.host_profile import HostProfile
from drivers.libvirt.migration.presence import incoming_domains
from drivers.libvirt.migration.service import MigrationService, SourceHost
from drivers.libvirt.own_events import OwnEvents
from drivers.libvirt.provision import Provisioner
from drivers.libvirt.restart_ops import RestartOps
from drivers.libvirt.published_ports import PublishedPorts
from drivers.libvirt.stream_access import StreamAccess
from drivers.ports.publisher import PortPublisher

_STOP_POLL_SECONDS = 0.2
#: A ping or a scrape waits this long for libvirt, then answers without it (Cattle waits 15 s).
_QUERY_TIMEOUT = 5.0
#: States are read in full this often (events keep them current in between); a list older
#: than _STATES_STALE (libvirt not answering) is read again before a ping uses it.
_STATES_EVERY = 10.0
_STATES_STALE = 60.0


def is_uuid(text: str) -> bool:
    """Whether `text` can name a domain by uuid (anything else is simply not ours)."""
    try:
        uuid_module.UUID(text)
    except (ValueError, TypeError, AttributeError):
        return False
    return True


class LibvirtDriver:
    def __init__(self, uri: str, *, policy: HostPolicy, domain_type: str = "auto",
                 logger: logging.Logger | None = None, open_timeout: float = 30.0,
                 ports: PortPublisher | None = None) -> None:
        self.uri = uri
        self.policy = policy
        self._requested_type = domain_type
        self._log = logger or logging.getLogger("herdsman.libvirt")
        self._conn = LibvirtConnection(uri, logger=self._log, open_timeout=open_timeout)
        self._profile: HostProfile | None = None
        self._registry: dict[str, AgentMetadata] = {}
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._availability_listeners: list[Callable[[bool], None]] = []
        self._adopted = asyncio.Event()
        self._adoption: asyncio.Task[None] | None = None
        self._own = OwnEvents()
        self._states = inventory.StateBook()
        self._background: set[asyncio.Task[Any]] = set()
        self._host_prepared = False
        self._dir_problem = False
        self._setup_problem: str | None = None  # refuses new VMs (and, at start-up, the start)
        self.provisioner = Provisioner(policy, logger=self._log)
        self.addresses = AddressBook(sources=LEASES, logger=self._log)
        self.ports = PublishedPorts(ports, network=policy.network or None, logger=self._log)
        self.streams = StreamAccess(self, network=policy.network if policy.network else None, logger=self._log)
        self._address_task: asyncio.Task[None] | None = None
        self.migrations = MigrationService(SourceHost(
            connection=self._connection, lock=lambda uuid: self._locks[uuid], require=self._require,
            purge=self.provisioner.purge, forget=self._forget, state_dir=policy.layout.state_dir), logger=self._log)
        self.restarts = RestartOps(locks=self._locks, call=self._call, lookup=self._lookup,
                                   registry=lambda: self._registry, own=self._own, logger=self._log)
        self.events = EventRouter(registry=lambda: self._registry, states=self._states, ports=self.ports,
                                  presence=self.migrations.presence, restarts=self.restarts, own=self._own,
                                  locks=self._locks, connection=self._conn.get, forget=self._forget,
                                  spawn=self._spawn, logger=self._log)

    # -- connection and adoption -----------------------------------------------------------
    async def start(self) -> None:
        """Connect (or start retrying) and, when connected, adopt before returning."""
        self._conn.add_connection_listener(self._on_connection)
        self._conn.add_lifecycle_listener(self.events.on_lifecycle)
        self.ports.start(registry=lambda: self._registry, state=self._states.get, addresses=self.addresses)
        await self._conn.start()
        if self._adoption is not None:
            await asyncio.shield(self._adoption)
            if self._setup_problem is not None and self._dir_problem:
                raise HostDirError(self._setup_problem)
        self._address_task = asyncio.create_task(self.addresses.run(self._running_domains), name="addresses")
        self._spawn(self._keep_states())

    async def wait_ready(self, timeout: float) -> None:
        await self._conn.wait_connected(timeout)
        await asyncio.wait_for(self._adopted.wait(), timeout)

    async def close(self) -> None:
        if self._address_task is not None:
            self._address_task.cancel()
        self.streams.close()
        await self.migrations.close()
        await self.ports.close()
        for task in list(self._background):
            task.cancel()
        await self._conn.close()

    def _running_domains(self) -> list[libvirt.virDomain]:
        """Blocking: the active domains that are ours (the address book calls it on a worker)."""
        conn = self._conn.get()
        return [d for d in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE) if d.UUIDString() in self._registry]

    @property
    def available(self) -> bool:
        return self._conn.connected

    @property
    def profile_or_none(self) -> HostProfile | None:
        """The host profile once libvirt has been reached (probed once per process)."""
        return self._profile

    @property
    def profile(self) -> HostProfile:
        if self._profile is None:
            raise Unavailable(f"libvirt at {self.uri} has not been reached yet")
        return self._profile

    def _on_connection(self, up: bool) -> None:
        if not up:
            for listener in self._availability_listeners:
                listener(False)
            return
        self._adoption = asyncio.get_running_loop().create_task(self._after_connect(), name="adoption")

    async def _after_connect(self) -> None:
        try:
            await self._adopt()
            self.ports.connected(self._conn.get())
            if not self._host_prepared:
                await self._prepare_host()
        except (libvirt.libvirtError, DriverError, LibvirtUnavailable) as exc:
            self._log.warning("adoption after connecting failed: %s", exc)
        except Exception:  # noqa: BLE001 - a bug here must show, and must not stop the agent
            self._log.exception("adoption after connecting failed")
        for listener in self._availability_listeners:
            listener(True)

    async def _adopt(self) -> None:
        """Read every managed domain from libvirt (changes none of them); on the first call, the
        host profile (after giving /dev/kvm its udev group and mode if it lacks them)."""
        conn = self._conn.get()
        if self._profile is None:  # probed once per process: each probe may cost seconds
            await asyncio.to_thread(host_setup.prepare_kvm_device, self.uri, self._log)
            session = self.uri.endswith("/session")
            self._profile = await threads.call(functools.partial(probe_host_profile, conn, self._requested_type,  # type: ignore[arg-type]
                                                                  session=session))
            for warning in self._profile.warnings:
                self._log.warning(warning)
        started = time.monotonic()
        self._registry = await threads.call(inventory.adopt_all, conn)
        self.migrations.presence.adopt_incoming(await threads.call(incoming_domains, conn, list(self._registry)))
        if self.migrations.recovers:
            self._spawn(self.migrations.recover())  # outgoing migrations an earlier run left unfinished
        await self._read_states()
        self._adopted.set()
        self._spawn(self.restarts.adopt(conn))  # in the background: pending restarts, VMs found shut off
        self._log.info(
            "adopted managed domains",
            extra={"count": len(self._registry), "seconds": round(time.monotonic() - started, 3)},
        )

    async def _prepare_host(self) -> None:
        """Once, on the first connection (drivers.libvirt.host_setup)."""
        self._host_prepared = True
        problem = await host_setup.prepare(self.uri, self.policy.layout, self.profile, self._connection(),
                                           self.provisioner.pool_path, self._log)
        if problem is not None:
            self._setup_problem, self._dir_problem = problem.message, problem.fatal

    def _refuse_new_vms(self) -> None:
        if self._setup_problem is not None:
            raise DriverError(self._setup_problem)

    def host_facts(self) -> dict[str, Any]:
        profile = self._profile
        return {
            "uri": self.uri,
            "libvirtVersion": profile.libvirt_version if profile else "",
            "qemuVersion": profile.qemu_version if profile else "",
            "domainType": profile.domain_type if profile else "",
            "warnings": list(profile.warnings) if profile else [],
        }

    def add_event_listener(self, listener: Callable[[HostEvent], None]) -> None:
        self.events.listeners.append(listener)

    def add_availability_listener(self, listener: Callable[[bool], None]) -> None:
        self._availability_listeners.append(listener)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- helpers -------------------------------------------------------------------------------
    def _connection(self) -> libvirt.virConnect:
        try:
            return self._conn.get()
        except LibvirtUnavailable as exc:
            raise Unavailable(str(exc)) from None

    async def _call(self, fn: Callable[..., Any], *args: Any, timeout: float | None = None,
                    lane: threads.Lane = "ops") -> Any:
        """A blocking libvirt step on a worker; libvirt's own errors become DriverErrors."""
        try:
            return await threads.call(fn, *args, timeout=timeout, lane=lane)
        except libvirt.libvirtError as exc:
            raise DriverError(domain_ops.libvirt_message(exc)) from None
        except LibvirtUnavailable as exc:
            raise Unavailable(str(exc)) from None

    def _lookup(self, uuid: str) -> libvirt.virDomain | None:
        """Blocking: our domain with this instance uuid, or None (any other name is not ours)."""
        if not is_uuid(uuid):
            return None
        try:
            dom = self._connection().lookupByUUIDString(uuid)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return None
            raise DriverError(domain_ops.libvirt_message(exc)) from None
        return dom if uuid in self._registry or inventory.read_metadata(dom) is not None else None

    def _require(self, uuid: str) -> libvirt.virDomain:
        """Blocking: as `_lookup`, NotFound when absent."""
        dom = self._lookup(uuid)
        if dom is None:
            raise NotFound(f"no virtual machine {uuid} on this host")
        return dom

    def _record(self, dom: libvirt.virDomain, uuid: str) -> VmRecord:
        """Blocking: the VM's record with its address (a lease lookup when not known yet)."""
        meta = self._registry.get(uuid)
        if meta is None:
            raise NotFound(f"no virtual machine {uuid} on this host")
        record = inventory.record(dom, meta)
        if record.state != "running":
            return record
        address = self.addresses.get(uuid) or self.addresses.refresh(dom)
        return replace(record, primary_ip=address)

    async def _fresh_record(self, dom: libvirt.virDomain, uuid: str) -> VmRecord:
        """The VM's record read from libvirt now; the state book learns its state too."""
        record: VmRecord = await self._call(self._record, dom, uuid)
        self._states.note(uuid, record.state)
        return record

    def _current(self, uuid: str) -> VmRecord:
        return self._record(self._require(uuid), uuid)

    # -- queries -------------------------------------------------------------------------------
    async def _read_states(self) -> None:
        at = time.monotonic()
        codes = await self._call(inventory.all_states, self._connection(), lane="query", timeout=_QUERY_TIMEOUT)
        self._states.replace(codes, at)

    async def _keep_states(self) -> None:
        """Forever: a full read of every domain's state every few seconds (events fill the gaps)."""
        while True:
            await asyncio.sleep(_STATES_EVERY)
            if not self.available:
                continue
            try:
                await self._read_states()
            except DriverError as exc:
                self._log.debug("state refresh skipped: %s", exc)

    async def list_vms(self) -> list[VmRecord]:
        """Every VM of ours with its state: from the state book, read again first only when it
        is stale. Unavailable (no list at all) when libvirt cannot say."""
        self._connection()
        if time.monotonic() - self._states.read_at > _STATES_STALE:
            try:
                await self._read_states()
            except threads.LibvirtTimeout as exc:  # a ping must answer in time: without a list
                raise Unavailable(str(exc)) from None
        records = []
        for uuid, meta in self._registry.items():
            state = self._states.get(uuid)
            if state is None or self.migrations.presence.hidden(uuid):
                continue
            records.append(VmRecord(
                instance_uuid=uuid, external_id=uuid, state=state,
                labels=dict(meta.labels), spec_hash=meta.spec_hash,
                image=meta.spec.get("imageUuid"), name=meta.spec.get("name"),
                primary_ip=self.addresses.get(uuid) if state == "running" else None,
            ))
        return records

    async def domain_stats(self) -> list[VmSample]:
        """Counters of every VM of ours, from one getAllDomainStats call (for metrics)."""
        names = {uuid: meta.spec.get("name") for uuid, meta in self._registry.items()}
        return await self._call(stats.collect, self._connection(), names, lane="query", timeout=_QUERY_TIMEOUT)

    def stored_spec(self, instance_uuid: str) -> dict[str, Any] | None:
        """The spec kept in the VM's metadata as the agent last defined it (None: not ours)."""
        meta = self._registry.get(instance_uuid)
        return None if meta is None else meta.spec

    async def get_vm(self, instance_uuid: str) -> VmRecord:
        return await self._call(self._current, instance_uuid, lane="query")

    async def inspect_vm(self, instance_uuid: str) -> dict[str, Any]:
        return await self._call(self._inspect, instance_uuid, lane="query")

    def _inspect(self, uuid: str) -> dict[str, Any]:
        dom = self._require(uuid)
        return domain_ops.inspect(self._connection(), dom, self._record(dom, uuid))

    async def ensure_image(self, reference: str, checksum: str | None,
                           progress: Callable[[int, str], Any] | None = None) -> dict[str, Any]:
        """Fetch an image into the host cache ahead of any VM (storage.image.activate)."""
        self._refuse_new_vms()
        return await self.provisioner.ensure_image(self._connection(), reference, checksum, progress)

    # -- lifecycle -------------------------------------------------------------------------------
    async def ensure_vm(self, spec: VirtualMachine, placement: Placement, *, start: bool) -> VmRecord:
        """Define the VM if needed, then start it if asked. Safe to repeat."""
        uuid = spec.instance_uuid
        async with self._locks[uuid], self.ports.allocating(uuid):
            conn = self._connection()
            dom = await self._call(self._lookup, uuid)
            if dom is None:
                self._refuse_new_vms()
            bindings = await self.ports.allocate(spec, self._registry, session=self.profile.session)
            inp = RenderInput(spec=spec, profile=self.profile, policy=self.policy, macs=placement.macs,
                              kernel_boot=await self.provisioner.kernel_boot(conn, spec, placement))
            domain = build_domain(inp)
            assert domain.metadata is not None
            domain.metadata = replace(domain.metadata, ports=bindings)
            restart_required = False
            created = None
            current = self._registry.get(uuid)
            if dom is not None and current is not None and current.spec_hash == domain.metadata.spec_hash:
                if current != domain.metadata:
                    await self._call(domain_ops.write_metadata, dom, domain.metadata, domain.title, domain.description)
                    self._registry[uuid] = domain.metadata
            else:
                was_running = dom is not None and bool(await self._call(dom.isActive))
                created = await self.provisioner.prepare(conn, inp, placement, new_domain=dom is None)
                try:
                    dom = await threads.call(conn.defineXMLFlags, to_xml(domain), libvirt.VIR_DOMAIN_DEFINE_VALIDATE)
                except (libvirt.libvirtError, DriverError) as exc:
                    await self.provisioner.undo(conn, created)
                    raise exc if isinstance(exc, DriverError) else DriverError(domain_ops.libvirt_message(exc)) from None
                restart_required = was_running
                self._registry[uuid] = domain.metadata
            await (self.restarts.controller_starts if start else self.restarts.controller_defines)(uuid, dom)
            if start:
                self._own.expect(uuid, "start")
                try:
                    await threads.call(domain_ops.start_if_stopped, dom)
                except (libvirt.libvirtError, DriverError) as exc:
                    if created is not None and created.new_domain:
                        await self._call(domain_ops.undefine, dom)
                        await self.provisioner.undo(conn, created)
                        self._registry.pop(uuid, None)
                    raise exc if isinstance(exc, DriverError) else DriverError(domain_ops.libvirt_message(exc)) from None
            record = await self._fresh_record(dom, uuid)
        return replace(record, restart_required=restart_required)

    async def start_vm(self, instance_uuid: str) -> VmRecord:
        async with self._locks[instance_uuid]:
            dom = await self._call(self._require, instance_uuid)
            await self.restarts.controller_starts(instance_uuid, dom)
            self._own.expect(instance_uuid, "start")
            await self._call(domain_ops.start_if_stopped, dom)
            return await self._fresh_record(dom, instance_uuid)

    async def stop_vm(self, instance_uuid: str, timeout: float) -> VmRecord:
        async with self._locks[instance_uuid]:
            dom = await self._call(self._require, instance_uuid)
            await self.restarts.controller_stops(instance_uuid, dom)
            await self._stop(dom, timeout)
            return await self._fresh_record(dom, instance_uuid)

    async def force_stop_vm(self, instance_uuid: str) -> VmRecord:
        return await self.stop_vm(instance_uuid, 0)

    async def restart_vm(self, instance_uuid: str, timeout: float) -> VmRecord:
        async with self._locks[instance_uuid]:
            dom = await self._call(self._require, instance_uuid)
            await self.restarts.controller_stops(instance_uuid, dom)
            await self._stop(dom, timeout)
            await self.restarts.controller_starts(instance_uuid, dom)
            self._own.expect_next(instance_uuid, "start")  # the stop's event may still be on its way
            await self._call(dom.create)
            return await self._fresh_record(dom, instance_uuid)

    async def remove_vm(self, instance_uuid: str, timeout: float) -> None:
        """Stop (gracefully within timeout) and undefine; volumes, seed and log stay for purge."""
        async with self._locks[instance_uuid]:
            self.restarts.controller_removes(instance_uuid)
            dom = await self._call(self._lookup, instance_uuid)
            if dom is None:
                return
            await self._stop(dom, timeout)
            await self._call(domain_ops.undefine, dom)
            self.ports.on_lifecycle(instance_uuid, "undefined")  # its rules go, if it had any
            self._registry.pop(instance_uuid, None)
            self.addresses.forget(instance_uuid)

    async def purge_vm(self, instance_uuid: str) -> None:
        """Remove if still defined, then delete every volume, the seed and the console logs."""
        await self.remove_vm(instance_uuid, 0)
        if not is_uuid(instance_uuid):
            return  # nothing of ours is named after it
        async with self._locks[instance_uuid]:
            await self._call(self.provisioner.purge, self._connection(), instance_uuid)

    async def set_labels(self, instance_uuid: str, labels: dict[str, str]) -> VmRecord:
        async with self._locks[instance_uuid]:
            dom = await self._call(self._require, instance_uuid)
            meta = self._registry[instance_uuid]
            updated = AgentMetadata(**{**meta.__dict__, "labels": dict(labels)})
            await self._call(domain_ops.set_metadata_element, dom, updated)
            self._registry[instance_uuid] = updated
            return await self._fresh_record(dom, instance_uuid)

    # -- migration (drivers/libvirt/migration/service.py) ------------------------------------------
    async def migrate_vm(self, instance_uuid: str, request: MigrateInput,
                         progress: MigrationProgressCallback | None = None) -> MigrationReport:
        return await self.migrations.migrate(instance_uuid, request, progress)

    async def cancel_migration(self, instance_uuid: str) -> bool:
        return self.migrations.cancel(instance_uuid)

    def _forget(self, uuid: str) -> None:
        self._registry.pop(uuid, None)
        self.addresses.forget(uuid)

    # -- streams (drivers.base: console, exec, logs and proxy go through here) --------------------
    async def domain(self, instance_uuid: str) -> libvirt.virDomain:
        """The libvirt domain of one of our VMs (NotFound otherwise, Unavailable without libvirt)."""
        return await self._call(self._require, instance_uuid, lane="query")

    async def require_vm(self, instance_uuid: str) -> None:
        await self.domain(instance_uuid)

    def console_log_path(self, instance_uuid: str) -> Path | None:
        meta = self._registry.get(instance_uuid)
        if meta is not None and (meta.spec.get("logConfig") or {}).get("driver") == "none":
            return None
        return self.policy.layout.console_log_path(instance_uuid)

    async def guest_network(self, instance_uuid: str, *, subnets: bool = False) -> GuestNetwork:
        dom = await self.domain(instance_uuid)
        primary = self.addresses.get(instance_uuid) or await self._call(self.addresses.refresh, dom, lane="query")
        if not subnets:
            return GuestNetwork(primary=primary)
        return await self._call(self.streams.managed_network, dom, primary, lane="query")

    async def attach_console(self, instance_uuid: str) -> ConsoleViewer:
        return await self.streams.attach_console(instance_uuid)

    async def open_graphics(self, instance_uuid: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await self.streams.open_graphics(await self.domain(instance_uuid))

    async def guest_exec(self, instance_uuid: str, argv: Sequence[str], *, stdin: bool,
                         tty: bool) -> GuestCommand:
        return await self.streams.guest_exec(await self.domain(instance_uuid), argv, stdin=stdin, tty=tty)

    # -- internals -------------------------------------------------------------------------------
    async def _stop(self, dom: libvirt.virDomain, timeout: float) -> None:
        """ACPI power button, wait up to `timeout` seconds, then pull the plug."""
        if not await self._call(dom.isActive):
            return
        self._own.expect(dom.UUIDString(), "stop", "die")
        if timeout > 0:
            try:
                await threads.call(dom.shutdown)
            except libvirt.libvirtError as exc:
                self._log.info("graceful shutdown refused, destroying", extra={"uuid": dom.UUIDString(), "error": str(exc)})
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                await asyncio.sleep(_STOP_POLL_SECONDS)
                if not await self._call(dom.isActive):
                    return
        await self._call(domain_ops.destroy, dom)
