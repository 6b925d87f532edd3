"""Health checks in `herdsman run`: which VMs the monitor watches, and where their state goes.

The monitor (agent/health/monitor.py) probes what it is told to; this module tells it, from
three sources that together cover every way a VM starts or stops:

- the controller's events, through the handlers' results (`wrap`): a VM running after
  `activate` (start count from the event) is watched; `deactivate`, `force.stop`, `remove`
  and `purge` unwatch it *before* the stop, so a guest shutting down is never reported DOWN;
  `restart` pauses it and resumes it as a restart (a healthy VM turns reinitializing);
- the driver's host events: a guest that stopped on its own (`stop`, `die`) pauses its watch
  (`monitor.stopped`), one undefined outside (`destroy`) is forgotten, one started outside is
  watched again;
- a reconciliation with the driver's VM list at start-up (VMs found running are adopted:
  watched as `resumed`, their address looked up first) and every RECONCILE_EVERY seconds
  (events lost while libvirtd was away, addresses learnt or changed).

Reconciliation and host events leave alone a VM an event handler is working on (its outcome
decides). The restart policy calls `vm_restarted` after it started a VM again.

Where the state goes: `healthState` in the ping's instance records and in the activate,
restart and inspect replies; `health_of` for the metrics; `<state dir>/health.json` for
`herdsman ls` (agent/health/state_file.py); and the reporter's `POST /serviceevents`.
Probe addresses: agent/health/addresses.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from agent.dispatcher import Route
from agent.health import state_file
from agent.health.addresses import PER_PASS, ProbeAddresses
from agent.health.monitor import HealthChange, HealthMonitor
from agent.health.reporter import HealthReporter, Post
from agent.protocol.events import Event
from agent.spec.cattle import instance_from_event, spec_from_cattle_instance
from agent.spec.errors import SpecError
from agent.spec.policies import InstanceHealthCheck
from drivers.base import DriverError, HostEvent

RECONCILE_EVERY = 10.0
ADDRESS_EVERY = 2.0
_FLUSH_DELAY = 0.5

Handler = Callable[[Event], Awaitable[dict[str, Any]]]
_STOPPING = ("compute.instance.deactivate", "compute.instance.force.stop", "compute.instance.remove",
             "compute.instance.purge")


def event_uuid(event: Event) -> str | None:
    """The instance an event is about (force.stop may name it in instanceForceStop.id)."""
    data = event.data if isinstance(event.data, dict) else {}
    instance = instance_from_event({"data": data}) or {}
    uuid = instance.get("uuid") if isinstance(instance, dict) else None
    target = data.get("instanceForceStop")
    if not uuid and isinstance(target, dict):
        uuid = target.get("id")
    return uuid if isinstance(uuid, str) and uuid else None


class HealthSupervisor:
    def __init__(self, driver: Any, *, host_uuid: str, state_dir: Path, logger: logging.Logger | None = None,
                 reconcile_every: float = RECONCILE_EVERY, address_every: float = ADDRESS_EVERY) -> None:
        self.driver = driver
        self.host_uuid = host_uuid
        self.path = state_file.path_in(state_dir)
        self.reconcile_every = reconcile_every
        self.address_every = address_every
        self._log = logger or logging.getLogger("herdsman.health")
        self.monitor: HealthMonitor | None = None
        self.reporter: HealthReporter | None = None
        # qemu:///session: user-mode networking, probed through qemu's forwarded ports
        session = str(getattr(driver, "uri", "")).endswith("/session")
        self.addresses = ProbeAddresses(driver, session=session, first_retry=address_every, logger=self._log)
        self._start_counts: dict[str, int] = {}  # every watched VM's, for its reports
        self._saved: dict[str, state_file.VmHealth] = {}  # what the last daemon wrote
        self._busy: Counter[str] = Counter()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._flush: asyncio.TimerHandle | None = None

    # -- life -------------------------------------------------------------------------------

    def start(self, post: Post | None) -> None:
        """After the driver adopted its VMs: the monitor, the reporter (when `post` is given),
        and (in the background) every VM running now."""
        self._saved = state_file.read(self.path, fresh_only=False)  # one small file, once
        self.monitor = HealthMonitor(self.addresses, listeners=[self], logger=self._log)
        if post is not None:
            self.reporter = HealthReporter(post, self.host_uuid, logger=self._log)
            self.monitor.add_listener(self.reporter)
        self.driver.add_event_listener(self._on_host_event)
        self.driver.add_availability_listener(self._on_availability)
        # in the background: adopting looks each VM's address up (a libvirt call each), and
        # the agent must subscribe and feed the watchdog meanwhile, even with libvirtd hung
        for loop in (self._adopt(), self._reconcile_loop(), self._address_loop(), self._heartbeat()):
            self._spawn(loop)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.monitor is not None:
            self.monitor.close()
            self._flush_now()
        if self.reporter is not None:
            await self.reporter.close()

    def resend(self) -> None:
        """The controller connection came back: every current state again (a lost report heals)."""
        if self.reporter is not None:
            self.reporter.resend_all()

    # -- what the rest of the agent asks -----------------------------------------------------

    def health_of(self, instance_uuid: str) -> str | None:
        """The VM's health state; None when it has no check or is not running."""
        state = self.monitor.health(instance_uuid) if self.monitor is not None else None
        return None if state is None else str(state)

    def vm_restarted(self, instance_uuid: str) -> None:
        """The restart policy started the VM again (same start count): reinitializing if it was
        healthy. Nothing when a host event or the reconciliation has seen it running already."""
        monitor = self.monitor
        if monitor is None:
            return
        if monitor.watching(instance_uuid):
            if monitor.health(instance_uuid) is None:
                monitor.restarted(instance_uuid)
                self._changed()
            return
        check = self._stored_check(instance_uuid)
        if check is not None:
            self._watch(instance_uuid, check, self._start_count(instance_uuid))

    def wrap(self, routes: dict[str, Route]) -> dict[str, Route]:
        """The routes with the health hooks around the compute handlers and the ping."""
        hooks: dict[str, Callable[[Handler, Event], Awaitable[dict[str, Any]]]] = {
            "ping": self._ping, "compute.instance.activate": self._activate,
            "compute.instance.restart": self._restart, "compute.instance.inspect": self._inspect,
            **{name: self._stopping for name in _STOPPING},
        }
        return {name: replace(route, handler=partial(hooks[name], route.handler)) if name in hooks else route
                for name, route in routes.items()}

    # -- handler hooks ------------------------------------------------------------------------

    async def _ping(self, handler: Handler, event: Event) -> dict[str, Any]:
        reply = await handler(event)
        for resource in reply.get("resources") or ():
            if resource.get("type") == "instance":
                state = self.health_of(str(resource.get("uuid")))
                if state is not None:
                    resource["healthState"] = state
        return reply

    async def _activate(self, handler: Handler, event: Event) -> dict[str, Any]:
        uuid = event_uuid(event)
        if uuid is None:
            return await handler(event)
        with self._handling(uuid):
            reply = await handler(event)
            fields = reply.get("instance", {}).get("+data", {}).get("+fields")
            if not isinstance(fields, dict):
                return reply
            spec = self._event_spec(event)
            check = spec.get("check")
            if fields.get("herdsmanState") == "running" and check is not None:
                self.addresses.learn(uuid, fields.get("primaryIpAddress"), fields.get("dockerPorts"))
                self._watch(uuid, check, spec.get("start_count", self._start_count(uuid)))
            else:
                self._unwatch(uuid)
            self._add_state(uuid, fields)
            return reply

    async def _restart(self, handler: Handler, event: Event) -> dict[str, Any]:
        uuid = event_uuid(event)
        if uuid is None or self.monitor is None:
            return await handler(event)
        with self._handling(uuid):
            self.monitor.stopped(uuid)  # the stop half: no probes, no reports; the state is kept
            reply = await handler(event)
            spec = self._event_spec(event)
            check = spec.get("check") or self._stored_check(uuid)
            fields = reply.get("instance", {}).get("+data", {}).get("+fields")
            if check is not None and isinstance(fields, dict) and fields.get("herdsmanState") == "running":
                self.addresses.learn(uuid, fields.get("primaryIpAddress"), fields.get("dockerPorts"))
                self._watch(uuid, check, spec.get("start_count", self._start_count(uuid)))  # a restart
                self._add_state(uuid, fields)
            return reply

    async def _stopping(self, handler: Handler, event: Event) -> dict[str, Any]:
        uuid = event_uuid(event)
        if uuid is None:
            return await handler(event)
        with self._handling(uuid):
            self._unwatch(uuid)  # before the stop: a guest shutting down is not unhealthy
            return await handler(event)

    async def _inspect(self, handler: Handler, event: Event) -> dict[str, Any]:
        reply = await handler(event)
        state = self.health_of(str(reply.get("id"))) if reply else None
        if state is not None:
            reply["healthState"] = state
        return reply

    # -- host events and reconciliation ------------------------------------------------------

    def _on_host_event(self, event: HostEvent) -> None:
        uuid, monitor = event.instance_uuid, self.monitor
        if monitor is None or self._busy[uuid]:
            return
        if event.status in ("stop", "die"):
            if monitor.watching(uuid):
                monitor.stopped(uuid)
                self._changed()
        elif event.status == "destroy":
            self._unwatch(uuid)
        elif event.status == "start" and monitor.health(uuid) is None:
            check = self._stored_check(uuid)
            if check is not None:
                self._watch(uuid, check, self._start_count(uuid))  # a paused watch: a restart

    def _on_availability(self, up: bool) -> None:
        if up and self.monitor is not None:
            self._spawn(self.reconcile())

    async def reconcile(self) -> None:
        """Match the watches to the driver's list: running VMs with a check watched (adopted:
        `resumed`, address looked up first), stopped ones paused, vanished ones forgotten."""
        monitor = self.monitor
        try:
            vms = await self.driver.list_vms()
        except DriverError:
            return  # libvirt away: the watches stay as they are
        if monitor is None:
            return
        listed = set()
        adopt: list[tuple[str, InstanceHealthCheck]] = []
        for vm in vms:
            uuid = vm.instance_uuid
            listed.add(uuid)
            if self._busy[uuid]:
                continue
            self.addresses.learn(uuid, vm.primary_ip)
            if vm.state == "running" and monitor.health(uuid) is None:
                check = self._stored_check(uuid)
                if check is not None:
                    adopt.append((uuid, check))
            elif vm.state in ("stopped", "crashed") and monitor.health(uuid) is not None:
                monitor.stopped(uuid)
                self._changed()
        for uuid in [u for u in self._start_counts if u not in listed and not self._busy[u]]:
            self._unwatch(uuid)
        lookups = asyncio.Semaphore(PER_PASS)

        async def adopt_one(uuid: str, check: InstanceHealthCheck) -> None:
            async with lookups:
                await self.addresses.look_up(uuid)
            if not self._busy[uuid] and monitor.health(uuid) is None:
                paused = monitor.watching(uuid)
                self._watch(uuid, check, self._start_count(uuid), resumed=not paused)
        await asyncio.gather(*(adopt_one(uuid, check) for uuid, check in adopt))

    async def _adopt(self) -> None:
        await self.reconcile()
        self._flush_now()
        if self._start_counts:
            self._log.info("health checks adopted", extra={"count": len(self._start_counts)})

    async def _reconcile_loop(self) -> None:
        while True:
            await asyncio.sleep(self.reconcile_every)
            try:
                await self.reconcile()
            except Exception:  # a bug here must show, and must not stop health checks
                self._log.exception("health reconciliation failed")

    async def _address_loop(self) -> None:
        """Addresses of watched VMs that have none yet; reconciliation keeps the others current."""
        while True:
            await asyncio.sleep(self.address_every)
            if self.monitor is not None:
                monitor = self.monitor
                await self.addresses.look_up_missing([u for u in self._start_counts if monitor.health(u) is not None])

    # -- watches ---------------------------------------------------------------------------

    def _watch(self, uuid: str, check: InstanceHealthCheck, start_count: int, *, resumed: bool = False) -> None:
        assert self.monitor is not None
        self._start_counts[uuid] = start_count
        self.monitor.watch(uuid, check, start_count, resumed=resumed)
        if not self.addresses.known(uuid):
            self._spawn(self.addresses.look_up(uuid))
        self._changed()

    def _unwatch(self, uuid: str) -> None:
        if self.monitor is not None and self.monitor.watching(uuid):
            self.monitor.unwatch(uuid)
            self._changed()
        self._start_counts.pop(uuid, None)
        self._saved.pop(uuid, None)
        self.addresses.forget(uuid)

    def _start_count(self, uuid: str) -> int:
        """The start count the VM's reports carry: the controller's last one (kept in
        health.json across agent restarts), else 0."""
        if uuid in self._start_counts:
            return self._start_counts[uuid]
        saved = self._saved.get(uuid)
        return saved.start_count if saved is not None else 0

    def _stored_check(self, uuid: str) -> InstanceHealthCheck | None:
        spec = self.driver.stored_spec(uuid) or {}
        raw = spec.get("healthCheck")
        if not raw:
            return None
        try:
            return InstanceHealthCheck.model_validate(raw)
        except ValidationError as exc:
            self._log.warning("stored healthCheck unreadable; the VM is not checked",
                              extra={"instanceUuid": uuid, "error": str(exc)})
            return None

    @staticmethod
    def _event_spec(event: Event) -> dict[str, Any]:
        """The event's healthCheck ("check") and startCount ("start_count"), when it has them."""
        instance = instance_from_event({"data": event.data if isinstance(event.data, dict) else {}})
        try:
            spec = spec_from_cattle_instance(instance)
        except SpecError:
            return {}
        found: dict[str, Any] = {"check": spec.health_check}
        if spec.start_count is not None:
            found["start_count"] = spec.start_count
        return found

    @contextlib.contextmanager
    def _handling(self, uuid: str) -> Iterator[None]:
        self._busy[uuid] += 1
        try:
            yield
        finally:
            self._busy[uuid] -= 1
            if not self._busy[uuid]:
                del self._busy[uuid]

    # -- HealthListener: health.json --------------------------------------------------------

    def health_changed(self, change: HealthChange) -> None:
        self._changed()

    def health_forgotten(self, instance_uuid: str) -> None:
        self._changed()

    def _add_state(self, uuid: str, fields: dict[str, Any]) -> None:
        state = self.health_of(uuid)
        if state is not None:
            fields["healthState"] = state

    def _changed(self) -> None:
        if self._flush is None:
            self._flush = asyncio.get_running_loop().call_later(_FLUSH_DELAY, self._flush_now)

    def _flush_now(self) -> None:
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
        if self.monitor is None:
            return
        vms = {uuid: state_file.VmHealth(self.health_of(uuid), count) for uuid, count in self._start_counts.items()}
        try:
            state_file.write(self.path, vms)
        except OSError as exc:
            self._log.warning("could not write the health state file", extra={"path": str(self.path), "error": str(exc)})

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(state_file.HEARTBEAT)
            self._flush_now()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
