"""Health reports to the controller, as Rancher's healthcheck service sent them.

Each transition to healthy or unhealthy becomes one `POST {CATTLE_URL}/serviceevents` with
exactly three fields (../shared/docs/healthcheck.md §2)::

    {"healthcheckUuid": "<hostUuid>_<instanceUuid>_<startCount>",
     "reportedHealth": "UP" | "DOWN",
     "externalTimestamp": <int Unix seconds>}

- The timestamp is taken when the report is made and never goes backwards (Cattle drops a
  report older than the last one it stored; an equal one is accepted), even if the wall clock
  does.
- 403 (Cattle creates its checker rows asynchronously after the instance starts), 409 (DOWN
  while the network stack upgrades), 429, 5xx and unreachable controllers are retried with
  capped, jittered exponential backoff. Other refusals (400, 401, 422...) would be refused
  the same way again: they are logged as errors and tried again only at the next re-send.
- A newer state supersedes a report still waiting for its retry: only the latest state of a
  VM is ever sent, one request at a time per VM, in order.
- The current state is re-sent every `resend_interval` (with ±10 % jitter, so the re-sends of
  a full host spread out), and at once for every VM on `resend_all()` (after the controller
  connection comes back): a report lost on the way, or a checker row Cattle re-created after a
  reconnect, heals without waiting for the next transition.

`INIT` is never sent: Cattle ignores it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any

import httpx

from agent.health.monitor import HealthChange
from agent.health.state import Reported
from agent.protocol.client import ControllerClient

PATH = "/serviceevents"
_RETRIED = frozenset({403, 409, 429})

#: POST one body to /serviceevents: (status, start of the reply body). Raises
#: httpx.TransportError (or OSError) when the controller cannot be reached.
Post = Callable[[dict[str, Any]], Awaitable[tuple[int, str]]]


def client_post(client: ControllerClient, authorization: str | None = None) -> Post:
    """A Post over the agent's controller connections, with the health key's credentials."""
    async def post(body: dict[str, Any]) -> tuple[int, str]:
        return await client.post_once(PATH, body, authorization=authorization)
    return post


def healthcheck_uuid(host_uuid: str, instance_uuid: str, start_count: int) -> str:
    """Cattle's 3-part checker id: this host checks this instance (the start count only
    keeps ids unique per start; Cattle ignores it)."""
    return f"{host_uuid}_{instance_uuid}_{start_count}"


@dataclass(frozen=True, slots=True)
class ServiceEvent:
    healthcheck_uuid: str
    reported_health: Reported
    external_timestamp: int

    def body(self) -> dict[str, Any]:
        return {"healthcheckUuid": self.healthcheck_uuid, "reportedHealth": self.reported_health,
                "externalTimestamp": self.external_timestamp}


@dataclass(eq=False)
class _Slot:
    """One VM: the event it should have at the controller, and the last one that got there.
    `serial` counts sends asked for (a re-send may carry an equal event), `done` the last one
    delivered."""

    wanted: ServiceEvent
    serial: int = 1
    done: int = 0
    delivered: ServiceEvent | None = None
    wake: asyncio.Event | None = None
    task: asyncio.Task[None] | None = None

    def want(self, event: ServiceEvent) -> None:
        self.wanted = event
        self.serial += 1
        assert self.wake is not None
        self.wake.set()

    @property
    def pending(self) -> bool:
        return self.done != self.serial


class HealthReporter:
    def __init__(self, post: Post, host_uuid: str, *, resend_interval: float = 300.0,
                 backoff_initial: float = 1.0, backoff_cap: float = 60.0, concurrency: int = 4,
                 clock: Callable[[], float] = time.time, logger: logging.Logger | None = None) -> None:
        """`concurrency` bounds this reporter's requests in flight, below the controller
        client's own limit, so a burst of re-sends never queues the agent's event replies."""
        self._post = post
        self.host_uuid = host_uuid
        self.resend_interval = resend_interval
        self._backoff_initial = backoff_initial
        self._backoff_cap = backoff_cap
        self._sending = asyncio.Semaphore(concurrency)
        self._clock = clock
        self._log = logger or logging.getLogger("herdsman.health")
        self._slots: dict[str, _Slot] = {}
        self._last_stamp = 0
        self._closed = False

    # -- HealthListener -----------------------------------------------------------------

    def health_changed(self, change: HealthChange) -> None:
        report = change.transition.report
        if report is not None:
            self.report(change.instance_uuid, change.start_count, report)

    def health_forgotten(self, instance_uuid: str) -> None:
        self.forget(instance_uuid)

    # -- the API --------------------------------------------------------------------------

    def report(self, instance_uuid: str, start_count: int, health: Reported) -> None:
        """Make `health` this VM's state at the controller (superseding anything unsent)."""
        if self._closed:
            return
        event = ServiceEvent(healthcheck_uuid(self.host_uuid, instance_uuid, start_count), health, self._stamp())
        slot = self._slots.get(instance_uuid)
        if slot is None:
            slot = self._slots[instance_uuid] = _Slot(event, wake=asyncio.Event())
            slot.task = asyncio.get_running_loop().create_task(self._deliver(instance_uuid, slot),
                                                               name=f"health-report-{instance_uuid}")
        else:
            slot.want(event)

    def forget(self, instance_uuid: str) -> None:
        """No more reports for this VM (it stopped or is gone)."""
        slot = self._slots.pop(instance_uuid, None)
        if slot is not None and slot.task is not None:
            slot.task.cancel()

    def resend_all(self) -> None:
        """Send every VM's current state again now, newly stamped."""
        for slot in self._slots.values():
            slot.want(replace(slot.wanted, external_timestamp=self._stamp()))

    def reported(self, instance_uuid: str) -> ServiceEvent | None:
        """The last event the controller accepted for this VM."""
        slot = self._slots.get(instance_uuid)
        return None if slot is None else slot.delivered

    @property
    def pending(self) -> int:
        """VMs whose current state has not reached the controller yet."""
        return sum(slot.pending for slot in self._slots.values())

    async def close(self) -> None:
        self._closed = True
        tasks = [slot.task for slot in self._slots.values() if slot.task is not None]
        self._slots.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- internals ----------------------------------------------------------------------

    def _stamp(self) -> int:
        self._last_stamp = max(self._last_stamp, int(self._clock()))
        return self._last_stamp

    async def _deliver(self, instance_uuid: str, slot: _Slot) -> None:
        """The VM's sender: the wanted event until it is delivered, then re-sends."""
        failures = 0
        while True:
            if not slot.pending:
                if await self._sleep(slot, self.resend_interval * random.uniform(0.9, 1.1)):
                    continue  # a newer state (or resend_all) woke it
                slot.want(replace(slot.wanted, external_timestamp=self._stamp()))
            event, serial = slot.wanted, slot.serial
            status, text = await self._send(event)
            if status is not None and 200 <= status < 300:
                slot.delivered, slot.done = event, serial
                if failures:
                    self._log.info("health report accepted after retrying", extra={
                        **self._context(instance_uuid, event), "attempts": failures + 1})
                failures = 0
                continue
            failures += 1
            retried = status is None or status in _RETRIED or status >= 500
            delay = self._backoff(failures) if retried else self.resend_interval
            level = logging.ERROR if not retried else logging.WARNING if failures == 1 else logging.DEBUG
            self._log.log(level, "health report refused; retrying" if retried else
                          "health report refused; trying again at the next re-send", extra={
                              **self._context(instance_uuid, event), "status": status, "error": text,
                              "attempt": failures, "retryIn": round(delay, 3)})
            if slot.serial == serial:  # else a newer state came in meanwhile: send that now
                await self._sleep(slot, delay)

    async def _send(self, event: ServiceEvent) -> tuple[int | None, str]:
        try:
            async with self._sending:
                return await self._post(event.body())
        except (httpx.TransportError, OSError) as exc:
            return None, f"{type(exc).__name__}: {exc}".rstrip(": ")

    async def _sleep(self, slot: _Slot, seconds: float) -> bool:
        """Wait `seconds`; True when woken early by a newer report."""
        assert slot.wake is not None
        slot.wake.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(slot.wake.wait(), seconds)
            return True
        return False

    def _backoff(self, failures: int) -> float:
        """Doubling from backoff_initial up to the cap, with "equal jitter" (half to all of it)
        so VMs refused together do not retry together."""
        ceiling = min(self._backoff_cap, self._backoff_initial * 2 ** min(failures - 1, 32))
        return ceiling * random.uniform(0.5, 1.0)

    def _context(self, instance_uuid: str, event: ServiceEvent) -> dict[str, Any]:
        return {"instanceUuid": instance_uuid, "healthcheckUuid": event.healthcheck_uuid,
                "reportedHealth": event.reported_health, "externalTimestamp": event.external_timestamp}
