"""The libvirt implementation of drivers.base.Hypervisor.

All libvirt calls run on the event loop thread: libvirtaio dispatches libvirt's own socket and
timer callbacks there, and its implementation is not safe to drive from worker threads. Calls
are short (the remote driver answers in milliseconds) except starting qemu (~1 s under TCG);
waits that can be long (a guest's ACPI shutdown) are asynchronous polls, never blocking calls.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from pathlib import Path
from dataclasses import replace
from typing import Any, Callable

import libvirt

from agent.spec.image import parse_image_ref
from agent.spec.vm import VirtualMachine
from drivers.base import DriverError, HostEvent, NotFound, Placement, Unavailable, VmRecord
from drivers.libvirt import inventory
from drivers.libvirt.addresses import LEASES, AddressBook
from drivers.libvirt.capabilities import probe_host_profile
from drivers.libvirt.connection import LibvirtConnection, LibvirtUnavailable
from drivers.libvirt.domxml import metadata
from drivers.libvirt.domxml.builder import build_domain
from drivers.libvirt.domxml.inputs import HostPolicy, RenderInput
from drivers.libvirt.domxml.model import AgentMetadata
from drivers.libvirt.domxml.writer import to_xml
from drivers.libvirt.events import LifecycleEvent
from drivers.libvirt.host_profile import HostProfile
from drivers.libvirt.provision import Provisioner

_UNDEFINE_FLAGS = (
    libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
    | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
    | libvirt.VIR_DOMAIN_UNDEFINE_NVRAM
)
_STOP_POLL_SECONDS = 0.2


def _libvirt_message(exc: libvirt.libvirtError) -> str:
    return f"libvirt: {exc.get_error_message() or exc}"


class LibvirtDriver:
    def __init__(self, uri: str, *, policy: HostPolicy, domain_type: str = "auto",
                 logger: logging.Logger | None = None) -> None:
        self.uri = uri
        self.policy = policy
        self._requested_type = domain_type
        self._log = logger or logging.getLogger("herdsman.libvirt")
        self._conn = LibvirtConnection(uri, logger=self._log)
        self._profile: HostProfile | None = None
        self._registry: dict[str, AgentMetadata] = {}
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._event_listeners: list[Callable[[HostEvent], None]] = []
        self._availability_listeners: list[Callable[[bool], None]] = []
        self._adopted = asyncio.Event()
        self.provisioner = Provisioner(policy, logger=self._log)
        self.addresses = AddressBook(sources=LEASES, logger=self._log)
        self._address_task: asyncio.Task[None] | None = None

    # -- connection and adoption -----------------------------------------------------------
    async def start(self) -> None:
        self._conn.add_connection_listener(self._on_connection)
        self._conn.add_lifecycle_listener(self._on_lifecycle)
        await self._conn.start()  # the connection listener adopts on every (re)connect, the first too
        self._address_task = asyncio.create_task(self.addresses.run(self._running_domains), name="addresses")

    async def wait_ready(self, timeout: float) -> None:
        await self._conn.wait_connected(timeout)
        await asyncio.wait_for(self._adopted.wait(), timeout)

    async def close(self) -> None:
        if self._address_task is not None:
            self._address_task.cancel()
        await self._conn.close()

    def _running_domains(self) -> list[libvirt.virDomain]:
        conn = self._conn.get()
        return [d for d in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE) if d.UUIDString() in self._registry]

    @property
    def available(self) -> bool:
        return self._conn.connected

    @property
    def profile(self) -> HostProfile:
        if self._profile is None:
            raise Unavailable(f"libvirt at {self.uri} has not been reached yet")
        return self._profile

    def _on_connection(self, up: bool) -> None:
        if up:
            try:
                self._adopt()
            except libvirt.libvirtError as exc:
                self._log.warning("adoption after reconnect failed: %s", exc)
        for listener in self._availability_listeners:
            listener(up)

    def _adopt(self) -> None:
        """Read every managed domain from libvirt; changes nothing on the host."""
        conn = self._conn.get()
        if self._profile is None:
            session = self.uri.endswith("/session")
            self._profile = probe_host_profile(conn, self._requested_type, session=session)  # type: ignore[arg-type]
            for warning in self._profile.warnings:
                self._log.warning(warning)
        started = time.monotonic()
        self._registry = inventory.adopt_all(conn)
        self._adopted.set()
        self._log.info(
            "adopted managed domains",
            extra={"count": len(self._registry), "seconds": round(time.monotonic() - started, 3)},
        )

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
        self._event_listeners.append(listener)

    def add_availability_listener(self, listener: Callable[[bool], None]) -> None:
        self._availability_listeners.append(listener)

    def _on_lifecycle(self, event: LifecycleEvent) -> None:
        if event.event == "defined" and event.uuid not in self._registry:
            self._refresh(event.uuid)  # defined from outside (virsh define of one of ours)
        if event.uuid not in self._registry:
            return
        if event.event == "undefined":
            self._registry.pop(event.uuid, None)
        if event.status is None:
            return
        if event.event != "undefined" and self._locks[event.uuid].locked():
            return  # the agent's own operation: its reply reports the state (container events are for changes on the host)
        host_event = HostEvent(instance_uuid=event.uuid, external_id=event.uuid, status=event.status,
                               timestamp=event.timestamp)
        for listener in self._event_listeners:
            listener(host_event)

    def _refresh(self, uuid: str) -> None:
        try:
            dom = self._conn.get().lookupByUUIDString(uuid)
            meta = inventory.read_metadata(dom)
        except (libvirt.libvirtError, LibvirtUnavailable):
            return
        if meta is not None:
            self._registry[uuid] = meta

    # -- helpers -------------------------------------------------------------------------------
    def _connection(self) -> libvirt.virConnect:
        try:
            return self._conn.get()
        except LibvirtUnavailable as exc:
            raise Unavailable(str(exc)) from None

    def _lookup(self, uuid: str) -> libvirt.virDomain | None:
        try:
            dom = self._connection().lookupByUUIDString(uuid)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return None
            raise DriverError(_libvirt_message(exc)) from None
        return dom if uuid in self._registry or inventory.read_metadata(dom) is not None else None

    def _record(self, uuid: str) -> VmRecord:
        dom = self._lookup(uuid)
        meta = self._registry.get(uuid)
        if dom is None or meta is None:
            raise NotFound(f"no virtual machine {uuid} on this host")
        return self._with_address(dom, inventory.record(dom, meta))

    def _with_address(self, dom: libvirt.virDomain, record: VmRecord) -> VmRecord:
        if record.state != "running":
            return record
        address = self.addresses.get(record.instance_uuid) or self.addresses.refresh(dom)
        return replace(record, primary_ip=address)

    # -- for the stream server (console, exec, logs, proxy) --------------------------------------
    def domain(self, instance_uuid: str) -> libvirt.virDomain:
        """The libvirt domain of one of our VMs (NotFound otherwise, Unavailable without libvirt)."""
        return self._require(instance_uuid)

    def console_log_path(self, instance_uuid: str) -> Path:
        return self.policy.layout.console_log_path(instance_uuid)

    def primary_address(self, instance_uuid: str) -> str | None:
        dom = self._require(instance_uuid)
        return self.addresses.get(instance_uuid) or self.addresses.refresh(dom)

    # -- queries -------------------------------------------------------------------------------
    async def list_vms(self) -> list[VmRecord]:
        conn = self._connection()
        states = inventory.all_states(conn)
        records = []
        for uuid, meta in self._registry.items():
            code = states.get(uuid)
            if code is None:
                continue
            records.append(VmRecord(
                instance_uuid=uuid, external_id=uuid, state=inventory.vm_state(code),
                labels=dict(meta.labels), spec_hash=meta.spec_hash,
                image=meta.spec.get("imageUuid"), name=meta.spec.get("name"),
                primary_ip=self.addresses.get(uuid) if code == libvirt.VIR_DOMAIN_RUNNING else None,
            ))
        return records

    async def get_vm(self, instance_uuid: str) -> VmRecord:
        return self._record(instance_uuid)

    async def inspect_vm(self, instance_uuid: str) -> dict[str, Any]:
        dom = self._lookup(instance_uuid)
        if dom is None:
            raise NotFound(f"no virtual machine {instance_uuid} on this host")
        record = self._record(instance_uuid)
        stats = {}
        try:
            for _, values in self._connection().domainListGetStats([dom], 0, 0):
                stats = {k: v for k, v in values.items() if isinstance(v, (int, float, str, bool))}
        except libvirt.libvirtError:
            pass  # stats are a bonus; the test driver lacks some groups
        return {
            "id": instance_uuid,
            "externalId": record.external_id,
            "state": record.state,
            "labels": record.labels,
            "specHash": record.spec_hash,
            "xml": dom.XMLDesc(0),
            "stats": stats,
        }

    async def ensure_image(self, reference: str, checksum: str | None,
                           progress: Callable[[int, str], Any] | None = None) -> dict[str, Any]:
        """Fetch an image into the host cache ahead of any VM (storage.image.activate)."""
        try:
            ref = parse_image_ref(reference)
        except ValueError as exc:
            raise DriverError(f"image: {exc}") from None
        conn = self._connection()
        images = self.provisioner.images
        if ref.kind == "kernel":
            boot = await images.ensure_kernel_image(conn, ref, checksum=checksum, progress=progress)
            return {"format": "kernel", "+data": {"herdsman": {"kernel": boot.kernel, "initrd": boot.initrd}}}
        base = await images.ensure_disk_image(conn, ref, checksum=checksum, progress=progress)
        return {"format": base.format, "virtualSizeMb": base.virtual_size >> 20,
                "+data": {"herdsman": {"volume": base.volume_name}}}

    # -- lifecycle -------------------------------------------------------------------------------
    async def ensure_vm(self, spec: VirtualMachine, placement: Placement, *, start: bool) -> VmRecord:
        """Define the VM if needed, then start it if asked. Safe to repeat."""
        uuid = spec.instance_uuid
        async with self._locks[uuid]:
            conn = self._connection()
            dom = self._lookup(uuid)
            inp = RenderInput(spec=spec, profile=self.profile, policy=self.policy, macs=placement.macs,
                              kernel_boot=await self.provisioner.kernel_boot(conn, spec, placement))
            domain = build_domain(inp)
            assert domain.metadata is not None
            restart_required = False
            created = None
            if dom is not None and self._registry.get(uuid) is not None and \
                    self._registry[uuid].spec_hash == domain.metadata.spec_hash:
                self._update_metadata(dom, domain.metadata, domain.title, domain.description)
            else:
                was_running = dom is not None and bool(dom.isActive())
                created = await self.provisioner.prepare(conn, inp, placement, new_domain=dom is None)
                try:
                    dom = conn.defineXMLFlags(to_xml(domain), libvirt.VIR_DOMAIN_DEFINE_VALIDATE)
                except libvirt.libvirtError as exc:
                    self.provisioner.undo(conn, created)
                    raise DriverError(_libvirt_message(exc)) from None
                restart_required = was_running
                self._registry[uuid] = domain.metadata
            if start and not dom.isActive():
                try:
                    dom.create()
                except libvirt.libvirtError as exc:
                    if created is not None and created.new_domain:
                        self._undefine(dom)
                        self.provisioner.undo(conn, created)
                        self._registry.pop(uuid, None)
                    raise DriverError(_libvirt_message(exc)) from None
            record = self._with_address(dom, inventory.record(dom, self._registry[uuid]))
        return replace(record, restart_required=restart_required)

    def _update_metadata(self, dom: libvirt.virDomain, meta: AgentMetadata, title: str | None,
                         description: str | None) -> None:
        flags = libvirt.VIR_DOMAIN_AFFECT_CONFIG | (libvirt.VIR_DOMAIN_AFFECT_LIVE if dom.isActive() else 0)
        current = self._registry.get(meta.instance_uuid)
        if current == meta:
            return
        dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, metadata.metadata_xml(meta), metadata.KEY,
                        metadata.NAMESPACE, flags)
        dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_TITLE, title or None, None, None, flags)
        dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_DESCRIPTION, description or None, None, None, flags)
        self._registry[meta.instance_uuid] = meta

    async def start_vm(self, instance_uuid: str) -> VmRecord:
        async with self._locks[instance_uuid]:
            dom = self._require(instance_uuid)
            if not dom.isActive():
                self._libvirt(dom.create)
            return self._record(instance_uuid)

    async def stop_vm(self, instance_uuid: str, timeout: float) -> VmRecord:
        async with self._locks[instance_uuid]:
            await self._stop(self._require(instance_uuid), timeout)
            return self._record(instance_uuid)

    async def force_stop_vm(self, instance_uuid: str) -> VmRecord:
        async with self._locks[instance_uuid]:
            await self._stop(self._require(instance_uuid), 0)
            return self._record(instance_uuid)

    async def restart_vm(self, instance_uuid: str, timeout: float) -> VmRecord:
        async with self._locks[instance_uuid]:
            dom = self._require(instance_uuid)
            await self._stop(dom, timeout)
            self._libvirt(dom.create)
            return self._record(instance_uuid)

    async def remove_vm(self, instance_uuid: str, timeout: float) -> None:
        """Stop (gracefully within timeout) and undefine; volumes, seed and log stay for purge."""
        async with self._locks[instance_uuid]:
            dom = self._lookup(instance_uuid)
            if dom is None:
                return
            await self._stop(dom, timeout)
            self._undefine(dom)
            self._registry.pop(instance_uuid, None)

    async def purge_vm(self, instance_uuid: str) -> None:
        """Remove if still defined, then delete every volume, the seed and the console logs."""
        await self.remove_vm(instance_uuid, 0)
        async with self._locks[instance_uuid]:
            self.provisioner.purge(self._connection(), instance_uuid)

    async def set_labels(self, instance_uuid: str, labels: dict[str, str]) -> VmRecord:
        async with self._locks[instance_uuid]:
            dom = self._require(instance_uuid)
            meta = self._registry[instance_uuid]
            updated = AgentMetadata(**{**meta.__dict__, "labels": dict(labels)})
            flags = libvirt.VIR_DOMAIN_AFFECT_CONFIG | (libvirt.VIR_DOMAIN_AFFECT_LIVE if dom.isActive() else 0)
            self._libvirt(dom.setMetadata, libvirt.VIR_DOMAIN_METADATA_ELEMENT, metadata.metadata_xml(updated),
                          metadata.KEY, metadata.NAMESPACE, flags)
            self._registry[instance_uuid] = updated
            return self._record(instance_uuid)

    # -- internals -------------------------------------------------------------------------------
    def _require(self, uuid: str) -> libvirt.virDomain:
        dom = self._lookup(uuid)
        if dom is None:
            raise NotFound(f"no virtual machine {uuid} on this host")
        return dom

    @staticmethod
    def _libvirt(fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return fn(*args)
        except libvirt.libvirtError as exc:
            raise DriverError(_libvirt_message(exc)) from None

    async def _stop(self, dom: libvirt.virDomain, timeout: float) -> None:
        """ACPI power button, wait up to `timeout` seconds, then pull the plug."""
        if not dom.isActive():
            return
        if timeout > 0:
            try:
                dom.shutdown()
            except libvirt.libvirtError as exc:
                self._log.info("graceful shutdown refused, destroying", extra={"uuid": dom.UUIDString(), "error": str(exc)})
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                await asyncio.sleep(_STOP_POLL_SECONDS)
                if not dom.isActive():
                    return
        try:
            dom.destroy()
        except libvirt.libvirtError as exc:
            if dom.isActive():
                raise DriverError(_libvirt_message(exc)) from None

    def _undefine(self, dom: libvirt.virDomain) -> None:
        try:
            dom.undefineFlags(_UNDEFINE_FLAGS)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return
            try:
                dom.undefine()  # drivers without NVRAM/snapshot support refuse the flags
            except libvirt.libvirtError:
                raise DriverError(_libvirt_message(exc)) from None
