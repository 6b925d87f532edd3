"""Applies the restart policy: one small task per VM that stopped on its own.

The driver tells the runner when a VM stopped without the agent or the controller asking
(`stopped`, from its lifecycle events: HostEvent stop/die with a cause) and, after an agent
restart, about each VM it found (`adopt`). The runner asks the driver for the facts (policy,
record, running?), decides (agent/restarts/policy.py), persists the record *before* waiting
— an agent killed during the backoff finds the restart pending and does it, uncounted, when it
comes back — waits, and asks the driver to start the VM only if nobody touched it meanwhile
Every write is a compare-and-set against the record the runner read or wrote last: the
controller's start or stop rewrites the record (under the driver's per-VM lock), so a runner
that lost that race changes nothing. A start that fails is tried again with growing delays,
as the same restart.

`cancel` drops a waiting restart at once when the controller acts on the VM.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from typing import Protocol

from agent.restarts.policy import MAX_DELAY, decide
from agent.restarts.record import RestartRecord
from agent.spec.policies import RestartPolicy
from drivers.base import StopCause


@dataclass(frozen=True, slots=True)
class RestartFacts:
    """What the driver knows of a VM: its policy, its stored record (None: none stored, e.g. a
    domain defined by an older agent: left alone), whether it runs."""

    policy: RestartPolicy | None
    record: RestartRecord | None
    running: bool


class RestartTarget(Protocol):
    """The driver side (phase 2: LibvirtDriver, the record under its own metadata key). Each
    call runs under the driver's per-VM lock, so it is atomic against the controller's events."""

    async def restart_facts(self, instance_uuid: str) -> RestartFacts: ...

    async def replace_restart_record(self, instance_uuid: str, expected: RestartRecord,
                                     record: RestartRecord) -> bool:
        """Store `record` if the stored one equals `expected`; False (nothing done) otherwise."""
        ...

    async def start_for_policy(self, instance_uuid: str, expected: RestartRecord) -> bool:
        """If the VM is shut off and its stored record equals `expected` (pending): start it
        and store `expected` with `pending` cleared. False (nothing done) otherwise."""
        ...


class RestartRunner:
    def __init__(self, target: RestartTarget, *, on_restarted: Callable[[str], None] | None = None,
                 clock: Callable[[], float] = time.time, logger: logging.Logger | None = None) -> None:
        """`on_restarted(instance_uuid)` runs after each restart the policy made (the agent
        reports it as a containerEvent and tells the health monitor)."""
        self._target = target
        self._on_restarted = on_restarted
        self._clock = clock
        self._log = logger or logging.getLogger("herdsman.restarts")
        self._tasks: dict[str, asyncio.Task[None]] = {}

    def stopped(self, instance_uuid: str, cause: StopCause, at: float) -> None:
        """A VM stopped on its own at `at` (Unix seconds). Repeats (libvirt says a power-off
        twice) are ignored while the first is being handled."""
        self._spawn(instance_uuid, cause, at)

    def adopt(self, instance_uuid: str, cause: StopCause | None) -> None:
        """After an agent (re)start, for each VM found: finishes a pending restart, clears a
        pending mark a killed agent left on a VM that did start, and applies the policy to a
        VM found shut off with a cause (from its libvirt state reason)."""
        self._spawn(instance_uuid, cause, self._clock(), adopting=True)

    def cancel(self, instance_uuid: str) -> None:
        task = self._tasks.pop(instance_uuid, None)
        if task is not None:
            task.cancel()

    @property
    def waiting(self) -> set[str]:
        return set(self._tasks)

    async def close(self) -> None:
        tasks = list(self._tasks.values())
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- internals ----------------------------------------------------------------------

    def _spawn(self, instance_uuid: str, cause: StopCause | None, at: float, adopting: bool = False) -> None:
        if instance_uuid in self._tasks:
            return
        task = asyncio.get_running_loop().create_task(self._handle(instance_uuid, cause, at, adopting),
                                                      name=f"restart-{instance_uuid}")
        self._tasks[instance_uuid] = task
        task.add_done_callback(partial(self._finished, instance_uuid))

    def _finished(self, instance_uuid: str, task: asyncio.Task[None]) -> None:
        if self._tasks.get(instance_uuid) is task:
            del self._tasks[instance_uuid]

    async def _handle(self, uuid: str, cause: StopCause | None, at: float, adopting: bool) -> None:
        try:
            facts = await self._target.restart_facts(uuid)
            record = facts.record
            if record is None:
                return
            if facts.running:
                if adopting and record.pending:  # killed between the start and writing it down
                    await self._target.replace_restart_record(uuid, record, replace(record, pending=False))
                return
            if record.pending:
                delay = max(0.0, (record.last_restart or 0.0) - self._clock())
                self._log.info("resuming a restart decided before the agent restarted", extra={
                    "instanceUuid": uuid, "restartCount": record.restart_count, "delay": round(delay, 3)})
            else:
                if cause is None:
                    return
                decision = decide(facts.policy, record, cause, at)
                if not decision.restart:
                    level = (logging.WARNING if "maximumRetryCount" in decision.reason
                             else logging.DEBUG if record.stopped_by_controller  # the usual: its own stop
                             else logging.INFO)
                    self._log.log(level, "not restarting a stopped VM", extra={
                        "instanceUuid": uuid, "cause": cause, "reason": decision.reason,
                        "restartCount": record.restart_count})
                    return
                if not await self._target.replace_restart_record(uuid, record, decision.record):
                    return  # the controller acted meanwhile
                record, delay = decision.record, decision.delay
                self._log.info("restarting a stopped VM", extra={
                    "instanceUuid": uuid, "cause": cause, "reason": decision.reason,
                    "restartCount": record.restart_count, "delay": round(delay, 3)})
            await self._start(uuid, record, delay, cause)
        except asyncio.CancelledError:
            raise
        except Exception:  # the driver failed: the next event or adoption tries again
            self._log.exception("restart policy failed", extra={"instanceUuid": uuid})

    async def _start(self, uuid: str, record: RestartRecord, delay: float, cause: StopCause | None) -> None:
        retry, waited = max(delay, 1.0), 0.0
        while True:
            waited += delay
            await asyncio.sleep(delay)
            try:
                started = await self._target.start_for_policy(uuid, record)
            except Exception as exc:
                delay, retry = retry, min(MAX_DELAY, retry * 2)
                self._log.warning("restart failed; trying again", extra={
                    "instanceUuid": uuid, "error": str(exc), "retryIn": round(delay, 3)})
                continue
            if not started:
                self._log.info("restart dropped: the VM was started, stopped or changed meanwhile",
                               extra={"instanceUuid": uuid})
                return
            self._log.info("VM restarted by its restart policy", extra={
                "instanceUuid": uuid, "cause": cause, "attempt": record.restart_count,
                "delay": round(waited, 3)})
            if self._on_restarted is not None:
                self._on_restarted(uuid)
            return
