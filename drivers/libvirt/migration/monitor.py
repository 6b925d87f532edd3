"""Watching a migration: `jobStats()` samples in, progress and decisions out (no libvirt calls).

Three concerns, kept apart because each one failed when mixed with another elsewhere:

- **Liveness**: a watchdog on bytes moved (memory + disk processed), not on bytes remaining,
  from the moment data can flow (not while the destination is still starting its QEMU).
  Remaining is a sawtooth while a guest dirties memory, and it stands still during the disk
  copy's memory-free phases; that is why Nova's progress timeout gave random failures and was
  removed. Bytes moved only stop when nothing flows: a network cut. Then: abort, "stalled".
- **Completion**: a deadline scaled by what must move (RAM + copied disks), see
  `MigrationOptions.completion_deadline`. At the deadline: switch to post-copy if allowed
  (it always completes while the network works), else abort.
- **Convergence** (pre-copy): the lowest `data_remaining` so far; when no new low at least
  `stall_min_improvement` better has come for `stall_window` seconds, pre-copy is not getting
  anywhere. With post-copy allowed (and one full pass done, as QEMU requires) we switch then;
  otherwise auto-converge's throttle is what helps, and the deadline bounds the wait.

Post-copy is never aborted for slowness, only paused when nothing flows (the runner then
uses `ABORT_JOB_POSTCOPY`, which keeps both halves for a `POSTCOPY_RESUME`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import libvirt

from drivers.libvirt.migration.options import MigrationOptions

MIB = 1 << 20
RATE_ALPHA = 0.4  # EWMA weight of the newest rate sample (KubeVirt uses the same)
ACTIVE = (libvirt.VIR_DOMAIN_JOB_BOUNDED, libvirt.VIR_DOMAIN_JOB_UNBOUNDED)

Phase = Literal["starting", "disks", "precopy", "postcopy", "aborting", "ended"]
Action = Literal["continue", "abort", "postcopy"]


@dataclass(frozen=True)
class JobSample:
    """One `virDomainGetJobStats` result, taken at `t` (monotonic seconds)."""

    t: float
    job_type: int = libvirt.VIR_DOMAIN_JOB_NONE
    data_total: int = 0
    data_remaining: int = 0
    memory_total: int = 0
    memory_processed: int = 0
    memory_remaining: int = 0
    memory_iteration: int = 0
    memory_dirty_rate: int = 0  # pages/s
    disk_total: int = 0
    disk_processed: int = 0
    disk_remaining: int = 0
    throttle: int = 0  # auto-converge CPU throttle, %

    @classmethod
    def from_stats(cls, stats: dict[str, Any], t: float) -> JobSample:
        def get(key: str) -> int:
            return int(stats.get(key) or 0)

        return cls(
            t=t,
            job_type=get("type"),
            data_total=get(libvirt.VIR_DOMAIN_JOB_DATA_TOTAL),
            data_remaining=get(libvirt.VIR_DOMAIN_JOB_DATA_REMAINING),
            memory_total=get(libvirt.VIR_DOMAIN_JOB_MEMORY_TOTAL),
            memory_processed=get(libvirt.VIR_DOMAIN_JOB_MEMORY_PROCESSED),
            memory_remaining=get(libvirt.VIR_DOMAIN_JOB_MEMORY_REMAINING),
            memory_iteration=get(libvirt.VIR_DOMAIN_JOB_MEMORY_ITERATION),
            memory_dirty_rate=get(libvirt.VIR_DOMAIN_JOB_MEMORY_DIRTY_RATE),
            disk_total=get(libvirt.VIR_DOMAIN_JOB_DISK_TOTAL),
            disk_processed=get(libvirt.VIR_DOMAIN_JOB_DISK_PROCESSED),
            disk_remaining=get(libvirt.VIR_DOMAIN_JOB_DISK_REMAINING),
            throttle=get(libvirt.VIR_DOMAIN_JOB_AUTO_CONVERGE_THROTTLE),
        )

    @property
    def active(self) -> bool:
        return self.job_type in ACTIVE

    @property
    def moved(self) -> int:
        """Bytes sent so far, memory and disks: grows whenever anything flows."""
        return self.memory_processed + self.disk_processed


@dataclass(frozen=True)
class Progress:
    phase: Phase
    elapsed: float
    percent: int | None = None
    remaining_mib: float | None = None
    rate_mib_s: float | None = None
    iteration: int = 0
    throttle: int = 0

    def message(self) -> str:
        """One line for a progress reply: `precopy 63 %, 120 MiB left, 35 MiB/s, iteration 4`."""
        parts = [self.phase]
        if self.percent is not None:
            parts[0] += f" {self.percent} %"
        if self.remaining_mib is not None:
            parts.append(f"{self.remaining_mib:.0f} MiB left")
        if self.rate_mib_s is not None:
            parts.append(f"{self.rate_mib_s:.1f} MiB/s")
        if self.iteration:
            parts.append(f"iteration {self.iteration}")
        if self.throttle:
            parts.append(f"throttle {self.throttle} %")
        return ", ".join(parts)


@dataclass(frozen=True)
class Decision:
    action: Action
    progress: Progress
    reason: str | None = None

    @property
    def in_postcopy(self) -> bool:
        return self.progress.phase == "postcopy"


class Monitor:
    """Feed it every sample in order; act on what it returns (once per abort/switch)."""

    def __init__(self, options: MigrationOptions, *, moved_bytes: int, started: float) -> None:
        self.options = options
        self.started = started
        self.deadline = options.completion_deadline(moved_bytes)
        self.phase: Phase = "starting"
        self.reason: str | None = None
        self._postcopy = False
        self._switch_requested = False
        self._seen_active = False
        self._last_moved = 0
        self._last_change = started
        self._prev: tuple[float, int] | None = None  # (t, moved) of the previous active sample
        self._rate: float | None = None
        self._low: int | None = None
        self._low_t = started

    def postcopy_started(self) -> None:
        """The runner switched the migration to post-copy."""
        self._postcopy = True

    def cancel(self, progress: Progress) -> Decision:
        """The user cancelled: abort, unless it is too late (post-copy runs on the destination)."""
        if self.phase in ("postcopy", "aborting", "ended"):
            return Decision("continue", progress)
        return self._abort(progress, "cancelled")

    def observe(self, s: JobSample) -> Decision:
        elapsed = s.t - self.started
        if not s.active:
            if self._seen_active or s.job_type != libvirt.VIR_DOMAIN_JOB_NONE:
                self.phase = "ended"
            return Decision("continue", Progress(self.phase, elapsed))
        self._seen_active = True
        self._update_rate(s)
        if self.phase not in ("aborting", "ended"):
            self.phase = self._phase(s)
        progress = self._progress(s, elapsed)
        if self.phase in ("aborting", "ended"):
            return Decision("continue", progress)

        if s.moved != self._last_moved or self.phase == "starting":
            # "starting": the destination is still starting its QEMU, nothing can move yet (seconds
            # on a busy host); a destination that never gets there meets the completion deadline
            self._last_moved, self._last_change = s.moved, s.t
        elif s.t - self._last_change >= self.options.progress_timeout:
            return self._abort(progress, f"stalled: no data moved for {s.t - self._last_change:.0f} s "
                                         "(is the network to the destination down?)")

        if self.phase == "postcopy":
            return Decision("continue", progress)  # completes while data flows; the watchdog guards it

        if elapsed >= self.deadline:
            if self._may_switch(s):
                return self._switch(progress, f"not complete after {elapsed:.0f} s "
                                              f"(deadline {self.deadline:.0f} s): switching to post-copy")
            return self._abort(progress, f"not complete after {elapsed:.0f} s (deadline {self.deadline:.0f} s "
                                         f"for this VM's memory and disks); {progress.message()}")

        if self.phase == "precopy" and self._stalled(s) and self._may_switch(s):
            return self._switch(progress, f"pre-copy is not converging ({s.data_remaining / MIB:.0f} MiB "
                                          f"left, no {self.options.stall_min_improvement:.0%} "
                                          f"improvement in {self.options.stall_window:.0f} s): "
                                          "switching to post-copy")
        return Decision("continue", progress)

    # -- internals ----------------------------------------------------------------------------

    def _phase(self, s: JobSample) -> Phase:
        if self._postcopy:
            return "postcopy"
        if s.memory_total:
            return "precopy"
        if s.disk_total:
            return "disks"
        return "starting"

    def _update_rate(self, s: JobSample) -> None:
        """Smoothed bytes/s from consecutive samples (libvirt's own bps goes stale when frozen)."""
        if self._prev is not None and s.t > self._prev[0]:
            current = max(0, s.moved - self._prev[1]) / (s.t - self._prev[0])
            self._rate = current if self._rate is None else RATE_ALPHA * current + (1 - RATE_ALPHA) * self._rate
        self._prev = (s.t, s.moved)

    def _progress(self, s: JobSample, elapsed: float) -> Progress:
        percent = None
        if s.data_total:
            percent = max(0, min(100, round(100 * (1 - s.data_remaining / s.data_total))))
        return Progress(
            phase=self.phase,
            elapsed=elapsed,
            percent=percent,
            remaining_mib=s.data_remaining / MIB if s.data_total else None,
            rate_mib_s=self._rate / MIB if self._rate is not None else None,
            iteration=s.memory_iteration,
            throttle=s.throttle,
        )

    def _stalled(self, s: JobSample) -> bool:
        if self._low is None or s.data_remaining < self._low * (1 - self.options.stall_min_improvement):
            self._low, self._low_t = s.data_remaining, s.t
            return False
        return s.t - self._low_t >= self.options.stall_window

    def _may_switch(self, s: JobSample) -> bool:
        # QEMU refuses a switch before the first full pass over memory has been sent
        return self.options.postcopy and not self._switch_requested and s.memory_iteration >= 2

    def _switch(self, progress: Progress, reason: str) -> Decision:
        self._switch_requested = True
        self.reason = reason
        return Decision("postcopy", progress, reason)

    def _abort(self, progress: Progress, reason: str) -> Decision:
        self.reason = reason
        decision = Decision("abort", progress, reason)
        self.phase = "aborting"
        return decision
