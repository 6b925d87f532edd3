"""The migration monitor replayed over jobStats traces: synthetic shapes (success, sawtooth,
plateau, stall, slow start, post-copy) and traces recorded from real migrations between the
test hosts (tests/migration_traces/, written by tests/test_migration_env.py)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import libvirt
import pytest

from drivers.libvirt.migration.monitor import MIB, Decision, JobSample, Monitor, Progress
from drivers.libvirt.migration.options import MigrationOptions

TRACES = Path(__file__).parent / "migration_traces"
RUNNING, DONE = libvirt.VIR_DOMAIN_JOB_UNBOUNDED, libvirt.VIR_DOMAIN_JOB_NONE
RAM = 256 * MIB


def sample(t: float, *, moved: float, remaining: float, iteration: int = 1, total: int = RAM,
           disk_total: int = 0, disk_moved: float = 0, job: int = RUNNING, throttle: int = 0) -> JobSample:
    return JobSample(t=t, job_type=job, data_total=total + disk_total, data_remaining=int(remaining),
                     memory_total=total, memory_processed=int(moved), memory_remaining=int(remaining),
                     memory_iteration=iteration, disk_total=disk_total, disk_processed=int(disk_moved),
                     throttle=throttle)


def replay(monitor: Monitor, samples: Iterable[JobSample]) -> list[tuple[float, Decision]]:
    """Every decision that was not 'continue', with its time; like the runner, a switch is obeyed."""
    acted = []
    for s in samples:
        decision = monitor.observe(s)
        if decision.action != "continue":
            acted.append((s.t, decision))
            if decision.action == "postcopy":
                monitor.postcopy_started()
    return acted


def every(step: float, until: float, start: float = 0.0) -> list[float]:
    return [round(start + i * step, 3) for i in range(int((until - start) / step) + 1)]


def test_an_idle_guest_converges_with_progress_and_no_action() -> None:
    monitor = Monitor(MigrationOptions(), moved_bytes=RAM, started=0.0)
    rate = 50 * MIB
    trace = [sample(t, moved=rate * t, remaining=max(0, RAM - rate * t), iteration=1 + int(t // 5))
             for t in every(0.5, 6)]
    trace.append(JobSample(t=6.5, job_type=DONE))
    progress = [monitor.observe(s).progress for s in trace]
    assert {p.phase for p in progress[:-1]} == {"precopy"} and progress[-1].phase == "ended"
    assert [p.percent for p in progress[:3]] == [0, 10, 20]
    assert progress[4].remaining_mib == pytest.approx(156.0)
    assert progress[4].rate_mib_s == pytest.approx(50.0)
    assert progress[4].message() == "precopy 39 %, 156 MiB left, 50.0 MiB/s, iteration 1"


def test_a_slow_start_does_not_trip_the_watchdog() -> None:
    """While the destination prepares, jobStats says UNBOUNDED with nothing moved (8 s seen here)."""
    monitor = Monitor(MigrationOptions(progress_timeout=10), moved_bytes=RAM, started=0.0)
    starting = [JobSample(t=t, job_type=RUNNING) for t in every(0.5, 8)]
    copying = [sample(t, moved=40 * MIB * (t - 8), remaining=RAM - 40 * MIB * (t - 8)) for t in every(0.5, 12, 8.5)]
    assert replay(monitor, starting + copying) == []
    assert monitor.phase == "precopy"


def test_a_destination_slower_to_start_than_the_watchdog_is_waited_for() -> None:
    """On a busy host the destination's QEMU took longer to start than a short progress timeout
    (the cut-link test's 6 s): nothing can move before, so that is not a stall; a stall once
    data flows still is, counted from the last byte moved."""
    monitor = Monitor(MigrationOptions(progress_timeout=6), moved_bytes=RAM, started=0.0)
    starting = [JobSample(t=t, job_type=RUNNING) for t in every(0.5, 20)]
    copying = [sample(t, moved=MIB * (t - 20), remaining=RAM - MIB * (t - 20)) for t in every(0.5, 24, 20.5)]
    frozen = [sample(t, moved=4 * MIB, remaining=RAM - 4 * MIB) for t in every(0.5, 40, 24.5)]
    acted = replay(monitor, starting + copying + frozen)
    assert [(t, d.action) for t, d in acted] == [(30.0, "abort")]


def test_disk_copy_then_memory_are_both_progress() -> None:
    monitor = Monitor(MigrationOptions(progress_timeout=5), moved_bytes=RAM + 64 * MIB, started=0.0)
    disks = [JobSample(t=t, job_type=RUNNING, data_total=64 * MIB, data_remaining=int(64 * MIB - 8 * MIB * t),
                       disk_total=64 * MIB, disk_processed=int(8 * MIB * t), disk_remaining=int(64 * MIB - 8 * MIB * t))
             for t in every(1, 8)]
    assert [monitor.observe(s).progress.phase for s in disks][-1] == "disks"
    memory = [sample(t, moved=50 * MIB * (t - 8), remaining=RAM - 50 * MIB * (t - 8), disk_total=64 * MIB,
                     disk_moved=64 * MIB) for t in every(1, 12, 9)]
    assert replay(monitor, memory) == []
    assert monitor.phase == "precopy"


def sawtooth(until: float, *, low: float = 20 * MIB, high: float = 90 * MIB, period: float = 4.0,
             rate: float = 30 * MIB) -> list[JobSample]:
    """A guest dirtying memory about as fast as it is sent: remaining rises and falls forever."""
    out = []
    for t in every(0.5, until):
        phase = (t % period) / period
        remaining = high - (high - low) * phase
        out.append(sample(t, moved=rate * t, remaining=remaining, iteration=2 + int(t // period)))
    return out


def test_a_sawtooth_is_never_taken_for_a_stall_and_ends_at_the_deadline() -> None:
    """Nova removed its progress timeout for exactly this shape: bytes keep moving, so ours holds."""
    options = MigrationOptions(progress_timeout=5, completion_min=60)
    acted = replay(Monitor(options, moved_bytes=RAM, started=0.0), sawtooth(90))
    assert len(acted) == 1
    t, decision = acted[0]
    assert t == 60 and decision.action == "abort"
    assert decision.reason.startswith("not complete after 60 s (deadline 60 s")


def test_a_non_converging_guest_switches_to_postcopy_when_allowed() -> None:
    options = MigrationOptions(postcopy=True, stall_window=20, completion_min=300)
    acted = replay(Monitor(options, moved_bytes=RAM, started=0.0), sawtooth(60))
    # the lowest point (28.75 MiB) comes at 3.5 s and is never beaten by 4 %: 20 s later, switch
    assert [(d.action, t) for t, d in acted] == [("postcopy", 23.5)]
    assert "not converging" in acted[0][1].reason


def test_a_plateau_switches_once_and_postcopy_then_runs_to_the_end() -> None:
    options = MigrationOptions(postcopy=True, stall_window=10, completion_min=30)
    plateau = [sample(t, moved=30 * MIB * t, remaining=65 * MIB + (t % 2) * MIB, iteration=2 + int(t))
               for t in every(0.5, 100)]
    acted = replay(Monitor(options, moved_bytes=RAM, started=0.0), plateau)
    assert [(d.action, t) for t, d in acted] == [("postcopy", 10.0)]  # no abort at the deadline in post-copy


def test_postcopy_waits_for_the_first_full_pass() -> None:
    options = MigrationOptions(postcopy=True, stall_window=5, completion_min=1000)
    first_pass = [sample(t, moved=MIB * t, remaining=RAM, iteration=1) for t in every(0.5, 20)]
    second = [sample(t, moved=MIB * t, remaining=RAM, iteration=2) for t in every(0.5, 22, 20.5)]
    acted = replay(Monitor(options, moved_bytes=RAM, started=0.0), first_pass + second)
    assert [(d.action, t) for t, d in acted] == [("postcopy", 20.5)]


def test_a_stall_aborts_once_after_the_progress_timeout() -> None:
    """A cut link: bytes stop moving (libvirt's bps stays stale); abort, once, with the reason."""
    options = MigrationOptions(progress_timeout=30)
    moving = [sample(t, moved=40 * MIB * t, remaining=RAM - 40 * MIB * t) for t in every(0.5, 4)]
    frozen = [sample(t, moved=160 * MIB, remaining=96 * MIB) for t in every(0.5, 60, 4.5)]
    monitor = Monitor(options, moved_bytes=RAM, started=0.0)
    acted = replay(monitor, moving + frozen)
    assert len(acted) == 1
    t, decision = acted[0]
    assert t == 34.0 and decision.action == "abort" and not decision.in_postcopy
    assert decision.reason == "stalled: no data moved for 30 s (is the network to the destination down?)"
    assert monitor.phase == "aborting" and monitor.reason == decision.reason


def test_a_stall_in_postcopy_pauses_rather_than_aborts() -> None:
    options = MigrationOptions(postcopy=True, progress_timeout=5, stall_window=5)
    monitor = Monitor(options, moved_bytes=RAM, started=0.0)
    monitor.postcopy_started()
    frozen = [sample(t, moved=100 * MIB, remaining=50 * MIB, iteration=3) for t in every(0.5, 10)]
    acted = replay(monitor, frozen)
    assert [(d.action, d.in_postcopy, t) for t, d in acted] == [("abort", True, 5.0)]


def test_cancel_aborts_in_precopy_but_not_in_postcopy() -> None:
    monitor = Monitor(MigrationOptions(), moved_bytes=RAM, started=0.0)
    progress = monitor.observe(sample(1, moved=MIB, remaining=RAM)).progress
    assert monitor.cancel(progress).reason == "cancelled"
    assert monitor.cancel(progress).action == "continue"  # once
    late = Monitor(MigrationOptions(), moved_bytes=RAM, started=0.0)
    late.postcopy_started()
    assert late.cancel(late.observe(sample(1, moved=MIB, remaining=RAM)).progress).action == "continue"


def test_progress_message_mentions_what_is_known() -> None:
    assert Progress("starting", 0.5).message() == "starting"
    assert Progress("precopy", 3, 63, 120.4, 35.25, 4, 20).message() == (
        "precopy 63 %, 120 MiB left, 35.2 MiB/s, iteration 4, throttle 20 %")


def recorded(name: str) -> tuple[dict[str, object], list[JobSample]]:
    data = json.loads((TRACES / f"{name}.json").read_text())
    return data, [JobSample(**s) for s in data["samples"]]


def test_recorded_idle_migration_between_the_test_hosts_runs_clean() -> None:
    meta, samples = recorded("idle-success")
    monitor = Monitor(MigrationOptions(), moved_bytes=meta["moved_bytes"], started=meta["started"])
    assert replay(monitor, samples) == []
    assert monitor.phase == "ended"
    phases = {monitor_phase for monitor_phase in _phases(meta, samples)}
    assert "precopy" in phases


def test_recorded_link_cut_is_detected_within_the_timeout_that_was_used() -> None:
    meta, samples = recorded("link-cut")
    options = MigrationOptions(**meta["options"])
    monitor = Monitor(options, moved_bytes=meta["moved_bytes"], started=meta["started"])
    acted = replay(monitor, samples)
    assert [d.action for _, d in acted] == ["abort"]
    t, decision = acted[0]
    assert decision.reason.startswith("stalled")
    assert t - meta["cut_at"] <= options.progress_timeout + 2 * options.poll_interval + 1


def _phases(meta: dict[str, object], samples: list[JobSample]) -> list[str]:
    monitor = Monitor(MigrationOptions(), moved_bytes=meta["moved_bytes"], started=meta["started"])
    return [monitor.observe(s).progress.phase for s in samples]
