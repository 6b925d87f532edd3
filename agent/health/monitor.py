"""Watches the health of this host's VMs: probes in, state transitions out.

The agent tells the monitor which running VMs have a healthCheck (`watch`), which went away or
were stopped by the controller (`unwatch`), which stopped on their own (`stopped`: probing and
reports pause, the state is kept) and which the restart policy started again (`restarted`: a
healthy VM is then reinitializing, as Cattle has it). Probe results go through the pure state machine (agent/health/state.py); every
transition — and nothing else — is logged as one structured line (`health state changed`) and
handed to the listeners, the controller reporter among them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Protocol

from agent.health import state as machine
from agent.health.probes import ProbeResult
from agent.health.request_line import parse_request_line
from agent.health.scheduler import AddressOf, ProbeScheduler, ProbeSpec
from agent.health.state import Health, Thresholds, Tracker, Transition
from agent.spec.policies import InstanceHealthCheck

_LOCAL_WARNING_EVERY = 60.0


@dataclass(frozen=True, slots=True)
class HealthChange:
    """A transition of one VM, with what the last probe saw."""

    instance_uuid: str
    start_count: int
    transition: Transition
    detail: str


class HealthListener(Protocol):
    def health_changed(self, change: HealthChange) -> None: ...
    def health_forgotten(self, instance_uuid: str) -> None: ...


@dataclass(slots=True)
class _Watch:
    check: InstanceHealthCheck
    start_count: int
    limits: Thresholds
    tracker: Tracker
    detail: str = ""
    paused: bool = False


def probe_spec(check: InstanceHealthCheck) -> ProbeSpec:
    """The probe a healthCheck asks for (its timeout is the interval when responseTimeout is 0,
    as HAProxy falls back to `inter` without `timeout check`)."""
    request = parse_request_line(check.request_line).request() if check.request_line else None
    timeout = (check.response_timeout or check.interval) / 1000
    return ProbeSpec(port=check.port, request=request, interval=check.interval / 1000, timeout=timeout)


class HealthMonitor:
    def __init__(self, address_of: AddressOf, *, max_in_flight: int = 256,
                 listeners: list[HealthListener] | None = None, logger: logging.Logger | None = None) -> None:
        """`address_of(instance_uuid, guest_port)` gives the (numeric host, port) to probe."""
        self._loop = asyncio.get_running_loop()
        self._log = logger or logging.getLogger("herdsman.health")
        self._listeners = list(listeners or [])
        self._watches: dict[str, _Watch] = {}
        self._scheduler = ProbeScheduler(address_of, self._on_result, max_in_flight=max_in_flight, loop=self._loop)
        self._local_warned = -_LOCAL_WARNING_EVERY

    def add_listener(self, listener: HealthListener) -> None:
        self._listeners.append(listener)

    # -- what the agent tells it --------------------------------------------------------

    def watch(self, instance_uuid: str, check: InstanceHealthCheck, start_count: int = 0, *,
              resumed: bool = False) -> None:
        """Probe a running VM. Safe to repeat: the same check and start count change nothing; a
        changed check keeps the state; a new start count (the controller started it again), or
        a VM that had `stopped`, is a restart. `resumed`: found running by a restarted agent."""
        now = self._loop.time()
        current = self._watches.get(instance_uuid)
        if current is not None and current.start_count == start_count and not current.paused:
            if current.check != check:
                current.check, current.limits = check, Thresholds.of(check)
                self._scheduler.add(instance_uuid, probe_spec(check))
            return
        spec = probe_spec(check)
        if current is None:
            tracker = machine.begin(now, resumed=resumed)
            self._watches[instance_uuid] = _Watch(check, start_count, Thresholds.of(check), tracker)
        else:  # started again: by the controller (a new start count) or after stopping on its own
            current.check, current.limits, current.start_count = check, Thresholds.of(check), start_count
            current.paused = False
            self._restart(instance_uuid, current, now)
        self._scheduler.add(instance_uuid, spec)

    def restarted(self, instance_uuid: str) -> None:
        """The VM was started again without a new start count (the restart policy did it)."""
        watch = self._watches.get(instance_uuid)
        if watch is not None:
            watch.paused = False
            self._restart(instance_uuid, watch, self._loop.time())
            self._scheduler.add(instance_uuid, probe_spec(watch.check))

    def stopped(self, instance_uuid: str) -> None:
        """The VM stopped on its own: no probes and no reports (its last state must not be
        re-sent as current) until it runs again; the state is kept for `restarted`."""
        watch = self._watches.get(instance_uuid)
        if watch is not None and not watch.paused:
            watch.paused = True
            self._scheduler.remove(instance_uuid)
            for listener in self._listeners:
                listener.health_forgotten(instance_uuid)

    def unwatch(self, instance_uuid: str) -> None:
        """The VM is gone or the controller stopped it: no more probes, no more reports, no state."""
        self._scheduler.remove(instance_uuid)
        watch = self._watches.pop(instance_uuid, None)
        if watch is not None and not watch.paused:
            for listener in self._listeners:
                listener.health_forgotten(instance_uuid)

    def close(self) -> None:
        self._scheduler.close()

    # -- what it tells the agent --------------------------------------------------------

    def health(self, instance_uuid: str) -> Health | None:
        """The VM's health state, None when it is not watched (no healthCheck, not running)."""
        watch = self._watches.get(instance_uuid)
        return None if watch is None or watch.paused else watch.tracker.state

    def watching(self, instance_uuid: str) -> bool:
        """Whether the VM is watched, running or stopped on its own (`stopped`)."""
        return instance_uuid in self._watches

    def snapshot(self) -> dict[str, Health]:
        return {uuid: watch.tracker.state for uuid, watch in self._watches.items() if not watch.paused}

    @property
    def in_flight(self) -> int:
        return self._scheduler.in_flight

    # -- internals ----------------------------------------------------------------------

    def _on_result(self, instance_uuid: str, result: ProbeResult) -> None:
        watch = self._watches.get(instance_uuid)
        if watch is None:
            return
        now = self._loop.time()
        if result.local:
            self._warn_local(instance_uuid, result)
            watch.tracker, transition = machine.expire(watch.tracker, watch.limits, now)
        else:
            watch.detail = result.detail
            watch.tracker, transition = machine.observe(watch.tracker, watch.limits, result.ok, now)
        if transition is not None:
            self._emit(instance_uuid, watch, transition)

    def _restart(self, instance_uuid: str, watch: _Watch, now: float) -> None:
        watch.tracker, transition = machine.restart(watch.tracker, now)
        watch.detail = ""
        self._emit(instance_uuid, watch, transition)

    def _emit(self, instance_uuid: str, watch: _Watch, transition: Transition) -> None:
        level = logging.WARNING if transition.current is Health.UNHEALTHY else logging.INFO
        reason = transition.reason
        if reason == "timeout":
            reason = f"{transition.previous} timeout"
        self._log.log(level, "health state changed", extra={
            "instanceUuid": instance_uuid, "healthState": str(transition.current),
            "previous": str(transition.previous), "reason": reason, "reported": transition.report,
            "detail": watch.detail, "port": watch.check.port,
            "check": "http" if watch.check.request_line else "tcp", "startCount": watch.start_count,
        })
        change = HealthChange(instance_uuid, watch.start_count, transition, watch.detail)
        for listener in self._listeners:
            try:
                listener.health_changed(change)
            except Exception:  # one broken listener must not stop the others or the probes
                self._log.exception("health listener failed", extra={"instanceUuid": instance_uuid})

    def _warn_local(self, instance_uuid: str, result: ProbeResult) -> None:
        now = time.monotonic()
        if now - self._local_warned >= _LOCAL_WARNING_EVERY:
            self._local_warned = now
            self._log.warning("health probe could not run on this host; the VM's state is kept",
                              extra={"instanceUuid": instance_uuid, "detail": result.detail})
