"""Runs every watched VM's probe once per interval, spread over the interval, few at a time.

One timer on the event loop drives everything: a heap of due times, woken at most once per
`quantum` (20 ms) to start every probe that is due, so 1,000 VMs cost fifty wake-ups a
second rather than one per probe. New VMs get first-probe offsets from the golden-ratio
sequence (k × 0.618… mod 1, times the interval), which spreads any number of VMs added at
once — an agent starting on a full host — evenly over their interval instead of probing them
all in the same instant.

At most `max_in_flight` probes run at once (a counting semaphore without tasks, one socket
each): when the host cannot keep up, probes start late rather than pile up. Probes of VMs that
drop packets hold their slot for the whole timeout, so with the defaults (256, Rancher's 2 s
timeout) up to 128 such probes a second fit; beyond that every VM's probes start later (state
changes are seen later, never wrongly), and the descriptors stay well under systemd's
default limit of 1,024. A VM's next probe is due one interval
after the previous one was due (a fixed rate), and never before that one finished: a probe
slower than the interval delays the next instead of overlapping it.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from agent.health.probes import Probe, ProbeResult, start_probe

#: The address to probe for a VM and the check's guest port: (numeric host, port), or None
#: while the VM has none yet. Called for every probe, so it must be a quick lookup.
AddressOf = Callable[[str, int], "tuple[str, int] | None"]
OnResult = Callable[[str, ProbeResult], None]

_GOLDEN = 0.6180339887498949
NO_ADDRESS = ProbeResult(False, "the VM has no address yet")


@dataclass(frozen=True, slots=True)
class ProbeSpec:
    """What to probe and how often; seconds."""

    port: int
    request: bytes | None
    interval: float
    timeout: float


class _Entry:
    """One watched VM. `done` is made once and handed to each of its probes; `active` goes
    False when the VM is removed or replaced, which turns its queued turns and late results
    into no-ops."""

    __slots__ = ("key", "spec", "due", "done", "probe", "active")

    def __init__(self, key: str, spec: ProbeSpec, due: float,
                 completed: Callable[[_Entry, ProbeResult], None]) -> None:
        self.key, self.spec, self.due = key, spec, due
        self.done: Callable[[ProbeResult], None] = partial(completed, self)
        self.probe: Probe | None = None
        self.active = True


class ProbeScheduler:
    def __init__(self, address_of: AddressOf, on_result: OnResult, *, max_in_flight: int = 256,
                 quantum: float = 0.02, loop: asyncio.AbstractEventLoop | None = None) -> None:
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        self._loop = loop or asyncio.get_running_loop()
        self._address_of = address_of
        self._on_result = on_result
        self.max_in_flight = max_in_flight
        self._quantum = quantum
        self._entries: dict[str, _Entry] = {}
        self._heap: list[tuple[float, int, _Entry]] = []
        self._order = itertools.count()
        self._added = 0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._last_tick = -1e9
        self.in_flight = 0
        self.closed = False

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, key: str, spec: ProbeSpec) -> None:
        """Probe `key` from now on (replacing what it had); the first probe comes within one
        interval, at its spread offset."""
        if self.closed:
            raise RuntimeError("the probe scheduler is closed")
        self.remove(key)
        offset = (self._added * _GOLDEN) % 1.0 * spec.interval
        self._added += 1
        entry = _Entry(key, spec, self._loop.time() + offset, self._completed)
        self._entries[key] = entry
        self._push(entry)

    def remove(self, key: str) -> None:
        """Stop probing `key`; a probe in flight is closed and its result dropped."""
        entry = self._entries.pop(key, None)
        if entry is None:
            return
        entry.active = False
        if entry.probe is not None:
            entry.probe.cancel()
            entry.probe = None
            self.in_flight -= 1

    def close(self) -> None:
        for key in list(self._entries):
            self.remove(key)
        self.closed = True
        self._heap.clear()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    # -- the loop -----------------------------------------------------------------------

    def _push(self, entry: _Entry) -> None:
        heapq.heappush(self._heap, (entry.due, next(self._order), entry))
        self._arm()

    def _arm(self) -> None:
        """Make sure a tick runs when the earliest probe is due (not sooner than a quantum
        after the last tick; not at all while every slot is taken: a finishing probe re-arms)."""
        if not self._heap or self.in_flight >= self.max_in_flight or self.closed:
            return
        at = max(self._heap[0][0], self._last_tick + self._quantum)
        if self._timer is not None:
            if self._timer_at <= at:
                return
            self._timer.cancel()
        self._timer, self._timer_at = self._loop.call_at(at, self._tick), at

    def _tick(self) -> None:
        self._timer = None
        now = self._last_tick = self._loop.time()
        horizon = now + self._quantum / 2
        heap = self._heap
        while heap and heap[0][0] <= horizon and self.in_flight < self.max_in_flight:
            entry = heapq.heappop(heap)[2]
            if entry.active:  # else removed or replaced since it was queued
                self._launch(entry)
        self._arm()

    def _launch(self, entry: _Entry) -> None:
        spec = entry.spec
        self.in_flight += 1
        address = self._address_of(entry.key, spec.port)
        if address is None:
            entry.done(NO_ADDRESS)
        else:
            entry.probe = start_probe(self._loop, address[0], address[1], spec.request, spec.timeout, entry.done)

    def _completed(self, entry: _Entry, result: ProbeResult) -> None:
        if not entry.active:
            return  # removed meanwhile: remove() already gave its slot back
        self.in_flight -= 1
        entry.probe = None
        # The next turn is one interval after this one was due; right away if that has passed
        # (the last tick's time stands in for now: at most a quantum old).
        entry.due = max(entry.due + entry.spec.interval, self._last_tick)
        self._push(entry)
        self._on_result(entry.key, result)
