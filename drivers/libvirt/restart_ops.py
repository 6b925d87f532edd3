"""The libvirt driver's side of the restart policy (agent.restarts.runner.RestartTarget).

The runner decides; this module gives it the facts and does what it asks, each step under the
driver's per-VM lock, and keeps the record (drivers/libvirt/restart_store.py) true to what the
controller did: the controller's start writes `started_by_controller` (the count starts again),
its stop `stopped_by_controller` (never undone), both before libvirt acts and under the same
lock, so a runner step that read the record earlier loses its compare-and-set. A controller
action also cancels a restart still waiting, once it holds the lock (the runner is then
sleeping or waiting for that lock, never half-way through a libvirt call).

Events reach the runner from the driver's lifecycle handler (`on_event`), and, after each
connection to libvirt, every VM found does (`adopt`), a shut-off one with the cause its state
reason gives: a restart an agent killed during the backoff left pending is done then, once.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any, Protocol

import libvirt
from pydantic import ValidationError

from agent.restarts.record import RecordError, RestartRecord
from agent.restarts.runner import RestartFacts
from agent.spec.policies import RestartPolicy
from drivers.base import StopCause
from drivers.libvirt.domxml.model import AgentMetadata
from drivers.libvirt.events import LifecycleEvent, shutoff_cause
from drivers.libvirt.own_events import OwnEvents
from drivers.libvirt.restart_store import read_record, write_record


class RestartHooks(Protocol):
    """What the driver tells the policy (agent.restarts.runner.RestartRunner has these)."""

    def stopped(self, instance_uuid: str, cause: StopCause, at: float) -> None: ...
    def adopt(self, instance_uuid: str, cause: StopCause | None) -> None: ...
    def cancel(self, instance_uuid: str) -> None: ...


Call = Callable[..., Awaitable[Any]]


def policy_of(meta: AgentMetadata | None) -> RestartPolicy | None:
    """The restartPolicy of the stored spec (it was validated when stored; None: none given)."""
    raw = (meta.spec if meta is not None else {}).get("restartPolicy")
    if raw is None:
        return None
    try:
        return RestartPolicy.model_validate(raw)
    except ValidationError:
        return None  # written by another version: treated as 'no'


# -- blocking steps (on a libvirt worker) --------------------------------------------------------

def read_facts(dom: libvirt.virDomain | None, policy: RestartPolicy | None,
               log: logging.Logger) -> RestartFacts:
    if dom is None:  # removed meanwhile: nothing to restart
        return RestartFacts(policy, None, False)
    try:
        record = read_record(dom)
    except RecordError as exc:  # it may say "stopped by the controller": never guess
        log.warning("restart record unreadable; the restart policy leaves this VM alone",
                    extra={"instanceUuid": dom.UUIDString(), "error": str(exc)})
        record = None
    return RestartFacts(policy, record, bool(dom.isActive()))


def _stored(dom: libvirt.virDomain) -> RestartRecord | None:
    try:
        return read_record(dom)
    except RecordError:
        return None


def compare_and_set(dom: libvirt.virDomain | None, expected: RestartRecord, record: RestartRecord) -> bool:
    if dom is None or _stored(dom) != expected:
        return False
    write_record(dom, record)
    return True


def start_if_expected(dom: libvirt.virDomain | None, expected: RestartRecord) -> bool:
    """Start a shut-off VM whose record is still `expected`, then clear `pending` (a kill in
    between leaves it set on a running VM: adoption clears it, nothing is started twice)."""
    if dom is None or dom.isActive() or _stored(dom) != expected:
        return False
    dom.create()
    write_record(dom, replace(expected, pending=False))
    return True


def mark_started(dom: libvirt.virDomain) -> None:
    """The controller starts the VM: the count starts again. A VM already running under a
    readable record keeps it (a repeated activate is not a new start), stored again: a
    redefinition (a new spec) replaced the persistent metadata without it."""
    stored = _stored(dom)
    if dom.isActive() and stored is not None and not stored.stopped_by_controller and not stored.pending:
        write_record(dom, stored)
    else:
        write_record(dom, RestartRecord.started_by_controller())


def mark_stopped(dom: libvirt.virDomain) -> None:
    write_record(dom, RestartRecord.stopped())


def mark_defined(dom: libvirt.virDomain) -> None:
    """Defined without a start (startOnCreate false): a shut-off VM stays so, the policy must
    not start it either; a running one keeps its record (stored again, as in mark_started)."""
    if not dom.isActive():
        write_record(dom, RestartRecord.stopped())
        return
    stored = _stored(dom)
    write_record(dom, stored if stored is not None else RestartRecord.started_by_controller())


def adoption_causes(conn: libvirt.virConnect, policies: dict[str, str]) -> dict[str, StopCause | None]:
    """Which VMs (uuid → policy name) the runner must see after a (re)connection, with the
    cause of the stop of a shut-off one (libvirt's state reason; None for one that runs): a
    running VM whose record still says pending (the agent was killed between the start and
    writing it down), and a shut-off one the policy may restart. VMs the controller stopped,
    VMs with policy `no` and VMs without a record are left out, not logged again each start."""
    causes: dict[str, StopCause | None] = {}
    for uuid, policy in policies.items():
        try:
            dom = conn.lookupByUUIDString(uuid)
            state, reason = dom.state()
            record = _stored(dom)
        except libvirt.libvirtError:
            continue  # undefined while we looked
        if record is None or record.stopped_by_controller:
            continue
        if state != libvirt.VIR_DOMAIN_SHUTOFF:
            if record.pending:
                causes[uuid] = None
        elif record.pending or policy != "no":
            causes[uuid] = shutoff_cause(reason)
    return causes


# -- the driver's side, on the loop ---------------------------------------------------------------

class RestartOps:
    """RestartTarget for the runner, and the hooks the driver calls. `lookup` is the driver's
    blocking lookup (None when the VM is not ours or gone), `call` its worker call."""

    def __init__(self, *, locks: Any, call: Call, lookup: Callable[[str], libvirt.virDomain | None],
                 registry: Callable[[], dict[str, AgentMetadata]], own: OwnEvents,
                 logger: logging.Logger) -> None:
        self._locks = locks
        self._call = call
        self._lookup = lookup
        self._registry = registry
        self._own = own
        self._log = logger
        #: set by the agent (agent/app.py) before the driver starts; None: no policy is applied
        self.runner: RestartHooks | None = None

    # RestartTarget ---------------------------------------------------------------------------
    async def restart_facts(self, instance_uuid: str) -> RestartFacts:
        async with self._locks[instance_uuid]:
            policy = policy_of(self._registry().get(instance_uuid))
            dom = await self._call(self._lookup, instance_uuid)
            return await self._call(read_facts, dom, policy, self._log)

    async def replace_restart_record(self, instance_uuid: str, expected: RestartRecord,
                                     record: RestartRecord) -> bool:
        async with self._locks[instance_uuid]:
            dom = await self._call(self._lookup, instance_uuid)
            return bool(await self._call(compare_and_set, dom, expected, record))

    async def start_for_policy(self, instance_uuid: str, expected: RestartRecord) -> bool:
        """Not a controller start: the count stays, and the start is reported by the agent as
        the policy's (its lifecycle event is the agent's own)."""
        async with self._locks[instance_uuid]:
            dom = await self._call(self._lookup, instance_uuid)
            self._own.expect(instance_uuid, "start")
            started = bool(await self._call(start_if_expected, dom, expected))
            if not started:
                self._own.expect(instance_uuid)  # nothing of ours will arrive
            return started

    # hooks the driver calls ---------------------------------------------------------------------
    def on_event(self, event: LifecycleEvent) -> None:
        """A lifecycle event of one of our VMs that the agent did not cause. Only `stopped`
        goes on: the domain is shut off then. A guest's power-off says `shutdown` first, while
        qemu still runs (the runner would find it running and do nothing), and a panic says
        `crashed` first (on_crash destroy: `stopped/crashed` follows)."""
        if event.event == "stopped" and event.cause is not None and self.runner is not None:
            self.runner.stopped(event.uuid, event.cause, event.timestamp)

    async def adopt(self, conn: libvirt.virConnect) -> None:
        """After each connection to libvirt: every VM of ours to the runner."""
        if self.runner is None:
            return
        policies = {uuid: (policy.name if (policy := policy_of(meta)) else "no")
                    for uuid, meta in self._registry().items()}
        try:
            causes = await self._call(adoption_causes, conn, policies)
        except Exception as exc:  # libvirt went away again: the next connection adopts again
            self._log.warning("restart policy: VMs not adopted", extra={"error": str(exc)})
            return
        for uuid, cause in causes.items():
            self.runner.adopt(uuid, cause)

    def _cancel(self, instance_uuid: str) -> None:
        """Call with the VM's lock held (see the module's docstring)."""
        assert self._locks[instance_uuid].locked()
        if self.runner is not None:
            self.runner.cancel(instance_uuid)

    async def controller_starts(self, instance_uuid: str, dom: libvirt.virDomain) -> None:
        self._cancel(instance_uuid)
        await self._call(mark_started, dom)

    async def controller_stops(self, instance_uuid: str, dom: libvirt.virDomain) -> None:
        self._cancel(instance_uuid)
        await self._call(mark_stopped, dom)

    async def controller_defines(self, instance_uuid: str, dom: libvirt.virDomain) -> None:
        self._cancel(instance_uuid)
        await self._call(mark_defined, dom)

    def controller_removes(self, instance_uuid: str) -> None:
        self._cancel(instance_uuid)
