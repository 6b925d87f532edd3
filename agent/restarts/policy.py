"""Whether, and after how long, to start a VM that stopped without being asked to.

Docker's policies (its restart manager), read for VMs:

- ``no``: never.
- ``always`` and ``unless-stopped``: whatever the cause. Docker tells them apart only for
  containers a user stopped by hand, which `always` starts again when the daemon restarts;
  herdsman's only "by hand" is the controller's stop, which neither policy ever undoes
  (`stopped_by_controller`), so here they behave the same.
- ``on-failure``: only after a failure — anything but the guest's own orderly power-off,
  docker's exit status 0 — and at most `maximumRetryCount` times (0: no limit).

Backoff, as docker's: 100 ms before the first restart, doubling before each next one, back to
100 ms when the VM had run for 10 s or more. The count is not reset by running (docker neither:
otherwise a guest that crashes a minute after every boot would be restarted for ever under
`on-failure:3`); it starts again from 0 when the controller starts the VM.

The cap is 5 minutes where docker has 1. A restart of a container costs milliseconds; a VM
boots for seconds of CPU (firmware, kernel, cloud-init; ~8 s of a core under TCG on these
machines) plus disk I/O, so a guest that can never boot, restarted every minute, would keep a
tenth of a core busy for nothing. At 5 minutes it is ~3 %, and the cap is reached after 12
quick failures (about 7 minutes of trying), while a VM that runs ≥ 10 s between failures is
never delayed by more than 100 ms.
"""

from __future__ import annotations

from dataclasses import dataclass

from agent.restarts.record import RestartRecord
from agent.spec.policies import RestartPolicy
from drivers.base import StopCause

FIRST_DELAY = 0.1
MAX_DELAY = 300.0
RESET_AFTER = 10.0


@dataclass(frozen=True, slots=True)
class Decision:
    """`restart` after `delay` seconds, with `record` persisted first; or not, and why."""

    restart: bool
    reason: str
    record: RestartRecord
    delay: float = 0.0


def backoff(record: RestartRecord, stopped_at: float) -> float:
    """The delay before the next restart: 100 ms, doubling while the VM keeps failing within
    10 s of its last restart, capped at MAX_DELAY."""
    if record.last_restart is None or stopped_at - record.last_restart >= RESET_AFTER:
        return FIRST_DELAY
    return min(MAX_DELAY, max(FIRST_DELAY, record.last_delay * 2))


def decide(policy: RestartPolicy | None, record: RestartRecord, cause: StopCause, stopped_at: float) -> Decision:
    """The policy's answer for a VM that stopped at `stopped_at` (Unix seconds) for `cause`."""
    name = policy.name if policy is not None else "no"
    if record.stopped_by_controller:
        return Decision(False, "the controller stopped it", record)
    if name == "no":
        return Decision(False, "restartPolicy is 'no'", record)
    if name == "on-failure":
        if cause == "poweroff":
            return Decision(False, "the guest powered off in order; 'on-failure' restarts only after a failure", record)
        limit = policy.maximum_retry_count if policy is not None else 0
        if limit and record.restart_count >= limit:
            return Decision(False, f"maximumRetryCount {limit} reached", record)
    delay = backoff(record, stopped_at)
    updated = RestartRecord(restart_count=record.restart_count + 1, last_delay=delay,
                            last_restart=stopped_at + delay, pending=True)
    return Decision(True, f"restartPolicy '{name}' after {cause}", updated, delay)
