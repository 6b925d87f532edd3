"""One scrape: gather asynchronously, then render the text off the event loop.

The order matters. The VM samples come from the driver's async stats call (one libvirt round
trip for every VM, never on the loop once the driver runs libvirt in its worker pool); the
image cache's size is a directory scan, in a thread; the agent's counters are copied on the
loop, where they change. Only then is the exposition text built, in a thread, from that
snapshot alone: for 1,000 VMs that is tens of milliseconds of CPU the loop should not spend
in one go.

The answer is always Prometheus' text format 0.0.4, which every Prometheus reads; OpenMetrics
would add nothing these metrics use (no exemplars, no native histograms).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass

from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.metrics_core import Metric

from agent.metrics.agent import AgentMetrics, ControllerView, ImageView, StreamView, read_state, state_families
from agent.metrics.vms import vm_text
from drivers.base import DriverError, VmSample

VmSamples = Callable[[], Awaitable[list[VmSample]]]
HealthOf = Callable[[str], "str | None"]


@dataclass(frozen=True)
class Snapshot:
    """What one scrape renders, copied at one moment."""

    agent: list[Metric]
    samples: list[VmSample]
    health: dict[str, str | None]

    def collect(self) -> Iterator[Metric]:
        """The agent's families, as a registry yields them (for prometheus_client's encoder)."""
        return (family for family in self.agent if family.samples)

    def render(self) -> bytes:
        return generate_latest(self) + vm_text(self.samples, self.health).encode()  # type: ignore[arg-type]


class Scraper:
    """Everything `/metrics` serves. Only `vm_samples` is required; each other source adds its
    families when given."""

    def __init__(self, vm_samples: VmSamples, *, events: AgentMetrics | None = None, health_of: HealthOf | None = None,
                 controller: ControllerView | None = None, streams: StreamView | None = None,
                 images: ImageView | None = None, stream_kinds: Iterable[str] = (),
                 logger: logging.Logger | None = None) -> None:
        self.vm_samples = vm_samples
        self.events = events
        self.health_of = health_of
        self.controller = controller
        self.streams = streams
        self.images = images
        self.stream_kinds = tuple(stream_kinds)
        self._log = logger or logging.getLogger("herdsman.metrics")
        self._lock = asyncio.Lock()  # one scrape at a time: a burst of scrapers must not pile up stats calls

    async def snapshot(self) -> Snapshot:
        async with self._lock:
            started = time.monotonic()
            try:
                samples, up = await self.vm_samples(), True
            except DriverError as exc:  # libvirt away: the agent's own metrics still matter
                self._log.warning("VM stats unavailable for this scrape", extra={"error": str(exc)})
                samples, up = [], False
            stats_seconds = time.monotonic() - started
            image_bytes = await asyncio.to_thread(self.images.cached_bytes) if self.images is not None else None
        state = read_state(libvirt_up=up, vm_stats_seconds=stats_seconds, controller=self.controller,
                           streams=self.streams, images=self.images, image_bytes=image_bytes)
        agent = state_families(state, self.stream_kinds)
        if self.events is not None:
            agent += self.events.families()
        health = {s.instance_uuid: self.health_of(s.instance_uuid) for s in samples} if self.health_of else {}
        return Snapshot(agent, samples, health)

    async def scrape(self) -> tuple[bytes, str]:
        """The body and its Content-Type."""
        snapshot = await self.snapshot()
        return await asyncio.to_thread(snapshot.render), CONTENT_TYPE_PLAIN_0_0_4
