"""The health state of one VM, as pure functions of probe results and time.

States are Cattle's `healthState` values (../shared/docs/healthcheck.md §3):

- ``initializing`` from the (first) start until `rise` consecutive passes make it ``healthy``.
  Failures do not make it unhealthy: Cattle ignores DOWN in this state, and a guest still
  booting is not sick.
- ``healthy`` until `fall` consecutive failures make it ``unhealthy``.
- ``unhealthy`` until `rise` consecutive passes make it ``healthy`` again.
- ``reinitializing`` after a restart of a healthy VM, like initializing (Cattle moves a healthy
  instance there when it starts again); a restart from any other state is ``initializing``.

The initializing timeout. Cattle has no initializing → unhealthy transition; its server-side
cleanup removes an instance still (re)initializing after the timeout. herdsman does not remove
anything, so when the timeout passes the VM becomes ``unhealthy`` here, is reported DOWN (a
Cattle server drops that report while the instance initializes, so it changes nothing there),
and is logged as a warning naming the timeout: the operator sees a VM that never came up in
`herdsman ls`, the ping and the log instead of a VM stuck "initializing" forever. Probing goes
on; `rise` passes later it is healthy and reported UP.

After an agent restart the VMs already running are adopted ``initializing`` with `resumed`
set: there is no boot to wait for, so `fall` failures make them unhealthy at once (reported
DOWN), and `rise` passes healthy (UP), whatever the controller last heard.

Counters are capped at their threshold, so a tracker has finitely many states and the tests
walk every one of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Literal

from agent.spec.policies import InstanceHealthCheck

Reported = Literal["UP", "DOWN"]


class Health(StrEnum):
    INITIALIZING = "initializing"
    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"
    REINITIALIZING = "reinitializing"


_WAITING = (Health.INITIALIZING, Health.REINITIALIZING)
_REPORT: dict[Health, Reported | None] = {
    Health.HEALTHY: "UP", Health.UNHEALTHY: "DOWN", Health.INITIALIZING: None, Health.REINITIALIZING: None,
}


@dataclass(frozen=True, slots=True)
class Thresholds:
    """The parts of a healthCheck the state machine needs; times in seconds (None: never)."""

    rise: int = 2
    fall: int = 3
    initializing_timeout: float | None = 60.0
    reinitializing_timeout: float | None = 60.0

    @classmethod
    def of(cls, check: InstanceHealthCheck) -> Thresholds:
        """From the spec (milliseconds; a timeout of 0 means none, like Cattle's null)."""
        return cls(
            rise=check.healthy_threshold,
            fall=check.unhealthy_threshold,
            initializing_timeout=check.initializing_timeout / 1000 or None,
            reinitializing_timeout=check.reinitializing_timeout / 1000 or None,
        )

    def timeout(self, state: Health) -> float | None:
        if state is Health.INITIALIZING:
            return self.initializing_timeout
        if state is Health.REINITIALIZING:
            return self.reinitializing_timeout
        return None


@dataclass(frozen=True, slots=True)
class Tracker:
    """One VM's health: the state, when it was entered, the current run of passes or failures."""

    state: Health
    since: float
    passes: int = 0
    failures: int = 0
    resumed: bool = False


@dataclass(frozen=True, slots=True)
class Transition:
    """A change of state; `report` is what goes to the controller (None: nothing)."""

    previous: Health
    current: Health
    reason: Literal["probe", "timeout", "restart"]
    at: float

    @property
    def report(self) -> Reported | None:
        return _REPORT[self.current] if self.reason != "restart" else None


def begin(now: float, *, resumed: bool = False) -> Tracker:
    """A VM just started (or, `resumed`, found running by a restarted agent)."""
    return Tracker(Health.INITIALIZING, now, resumed=resumed)


def restart(tracker: Tracker, now: float) -> tuple[Tracker, Transition]:
    """The VM started again: reinitializing if it was healthy, else initializing."""
    state = Health.REINITIALIZING if tracker.state is Health.HEALTHY else Health.INITIALIZING
    return Tracker(state, now), Transition(tracker.state, state, "restart", now)


def observe(tracker: Tracker, limits: Thresholds, passed: bool, now: float) -> tuple[Tracker, Transition | None]:
    """Fold one probe result in; then apply the (re)initializing timeout."""
    if passed and tracker.state is Health.HEALTHY and tracker.passes == limits.rise and not tracker.failures:
        return tracker, None  # the steady state of nearly every probe: nothing to compute
    if passed:
        passes, failures = min(tracker.passes + 1, limits.rise), 0
    else:
        passes, failures = 0, min(tracker.failures + 1, limits.fall)
    state = tracker.state
    if passes >= limits.rise and state is not Health.HEALTHY:
        state = Health.HEALTHY
    elif failures >= limits.fall and (state is Health.HEALTHY or (tracker.resumed and state in _WAITING)):
        state = Health.UNHEALTHY
    if state is not tracker.state:
        return Tracker(state, now, passes, failures), Transition(tracker.state, state, "probe", now)
    updated = Tracker(state, tracker.since, passes, failures, tracker.resumed)
    return expire(updated, limits, now)


def expire(tracker: Tracker, limits: Thresholds, now: float) -> tuple[Tracker, Transition | None]:
    """Unhealthy once the (re)initializing timeout has passed without a healthy result."""
    timeout = limits.timeout(tracker.state)
    if timeout is None or now - tracker.since < timeout:
        return tracker, None
    updated = Tracker(Health.UNHEALTHY, now, tracker.passes, tracker.failures)
    return updated, Transition(tracker.state, Health.UNHEALTHY, "timeout", now)
