"""Libvirt domain lifecycle events, mapped to the container statuses Cattle understands.

Cattle learns about state changes that happen on the host (a guest powered itself off, qemu
crashed, someone ran ``virsh destroy``) through ``containerEvent`` with an ``externalStatus`` of
Docker's vocabulary. This module is the one place that decides which libvirt event means which
status, so the mapping is a pure table that tests pin down.

The table (event / detail → status; names are libvirt's, lower case):

================  ==============================  ===========  ====================================
event             detail                          status       why
================  ==============================  ===========  ====================================
defined           any                             None         configuration only, nothing ran
undefined         removed                         destroy      the domain is gone, like ``docker rm``
undefined         renamed                         None         same VM under a new name, not removed
started           any (booted, migrated,          start        a qemu process now runs the VM here
                  restored, from_snapshot,
                  wakeup, recreated)
suspended         any                             None         paused, still alive; Cattle has no
                                                               paused state to report
resumed           any, right after ``crashed``    start        on_crash=restart: libvirt resets the
                                                               guest and resumes it (no new
                                                               ``started`` event)
resumed           any, otherwise                  None         un-paused: it never stopped
stopped           shutdown                        stop         the guest shut down in order
stopped           destroyed                       die          killed from outside (virsh destroy)
stopped           crashed, failed                 die          qemu died, or failed while running
stopped           saved                           stop         state saved to disk, process gone;
                                                               a restore reports ``start``
stopped           from_snapshot                   stop         an offline snapshot was reverted to
stopped           migrated                        None         the VM runs on another host now;
                                                               the migration reports the move
shutdown          finished, guest                 stop         the guest powered itself off
                                                               (qemu >= 2.10 says ``guest``)
shutdown          host                            None         qemu was told to quit (SIGTERM on
                                                               destroy, QMP quit); the ``stopped``
                                                               event that follows says how
pmsuspended       any                             None         guest sleeps (S3/S4), still defined
crashed           any (panicked, crashloaded)     die          guest kernel panic
unknown codes     --                              None         newer libvirt; named ``unknown-<n>``
================  ==============================  ===========  ====================================

A guest power-off arrives twice (``shutdown`` then ``stopped``) and a crash may too
(``crashed`` then ``stopped/crashed`` with on_crash=destroy); a start is preceded by
``resumed/unpaused`` (qemu starts paused). Consumers must treat statuses as idempotent.

Each stop also carries its cause for the restart policy (drivers.base.StopCause): ``poweroff``
for shutdown/finished, shutdown/guest and stopped/shutdown; ``killed`` for stopped/destroyed;
``crashed`` for stopped/crashed; ``failed`` for stopped/failed. ``crashed/*`` itself has none:
with on_crash=destroy a ``stopped/crashed`` follows, with on_crash=restart libvirt resets the
guest in place and nothing stopped. Saved, migrated and snapshot-reverted guests have none
either: someone moved them on purpose. A domain found shut off (adoption) gets its cause from
its state reason (:func:`shutoff_cause`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from drivers.base import StopCause

Status = Literal["start", "stop", "die", "destroy"]

# Index = libvirt's enum value (virDomainEventType and the per-event detail enums). These are
# part of libvirt's stable ABI, so they are spelled out rather than looked up in the bindings,
# which may be older than the daemon.
_EVENTS: tuple[str, ...] = (
    "defined", "undefined", "started", "suspended", "resumed",
    "stopped", "shutdown", "pmsuspended", "crashed",
)
_DETAILS: dict[str, tuple[str, ...]] = {
    "defined": ("added", "updated", "renamed", "from_snapshot"),
    "undefined": ("removed", "renamed"),
    "started": ("booted", "migrated", "restored", "from_snapshot", "wakeup", "recreated"),
    "suspended": ("paused", "migrated", "ioerror", "watchdog", "restored", "from_snapshot",
                  "api_error", "postcopy", "postcopy_failed"),
    "resumed": ("unpaused", "migrated", "from_snapshot", "postcopy", "postcopy_failed"),
    "stopped": ("shutdown", "destroyed", "crashed", "migrated", "saved", "failed",
                "from_snapshot"),
    "shutdown": ("finished", "guest", "host"),
    "pmsuspended": ("memory", "disk"),
    "crashed": ("panicked", "crashloaded"),
}
_CAUSES: dict[tuple[str, str], StopCause] = {
    ("shutdown", "finished"): "poweroff", ("shutdown", "guest"): "poweroff", ("stopped", "shutdown"): "poweroff",
    ("stopped", "destroyed"): "killed", ("stopped", "crashed"): "crashed", ("stopped", "failed"): "failed",
}
# virDomainShutoffReason, by value: unknown, shutdown, destroyed, crashed, migrated, saved, failed,
# from_snapshot, daemon.
_SHUTOFF: tuple[StopCause | None, ...] = ("lost", "poweroff", "killed", "crashed", None, None, "failed", None, "lost")
_STOPPED: dict[str, Status | None] = {
    "shutdown": "stop", "destroyed": "die", "crashed": "die", "failed": "die",
    "saved": "stop", "from_snapshot": "stop", "migrated": None,
}


@dataclass(frozen=True)
class LifecycleEvent:
    """One domain lifecycle event as received from libvirt, with its Cattle status."""

    uuid: str
    name: str
    event: str
    detail: str
    status: Status | None
    timestamp: float
    cause: StopCause | None = None


def event_names(event: int, detail: int) -> tuple[str, str]:
    """Libvirt's names for an event/detail pair, lower case; ``unknown-<n>`` for new codes."""
    ev = _EVENTS[event] if 0 <= event < len(_EVENTS) else f"unknown-{event}"
    details = _DETAILS.get(ev, ())
    return ev, details[detail] if 0 <= detail < len(details) else f"unknown-{detail}"


def _status(event: str, detail: str, after_crash: bool) -> Status | None:
    if event == "started":
        return "start"
    if event == "resumed":
        return "start" if after_crash else None
    if event == "stopped":
        return _STOPPED.get(detail)
    if event == "shutdown":
        return None if detail == "host" else "stop"
    if event == "crashed":
        return "die"
    if event == "undefined":
        return "destroy" if detail == "removed" else None
    return None


def to_lifecycle_event(uuid: str, name: str, event: int, detail: int, now: float, *,
                       after_crash: bool = False) -> LifecycleEvent:
    """Map a raw libvirt lifecycle callback to a :class:`LifecycleEvent`.

    ``after_crash`` says the previous event for this domain was ``crashed``: only then does a
    ``resumed`` mean the guest was restarted (see the table above). The caller keeps that one
    bit of history so this stays a pure function.
    """
    ev, det = event_names(event, detail)
    return LifecycleEvent(uuid=uuid, name=name, event=ev, detail=det,
                          status=_status(ev, det, after_crash), timestamp=now, cause=_CAUSES.get((ev, det)))


def shutoff_cause(reason: int) -> StopCause | None:
    """The cause of a domain found shut off, from `virDomainGetState`'s reason (an unknown
    reason from a newer libvirt counts as lost)."""
    return _SHUTOFF[reason] if 0 <= reason < len(_SHUTOFF) else "lost"
