"""The agent's own metrics: events (observed as they finish) and state read at scrape time.

Event latencies must be recorded when each event finishes, so they live in a histogram the
dispatcher feeds (`AgentMetrics.event_handled`), next to the process' CPU, memory and file
descriptors. Everything else already exists as plain counters on
the objects that own it (the controller client, the stream server, the image cache); a scrape
reads them into an `AgentState` snapshot, on the event loop where they change, so the modules
that keep them never import prometheus_client.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from prometheus_client import CollectorRegistry, Histogram, ProcessCollector, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from agent import __version__

#: from a ping (milliseconds) to an image download or a slow guest's shutdown (minutes)
EVENT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


# `*_created` series (a timestamp per label set) only lengthen every scrape: Prometheus' text
# format has no use for them. A process-wide switch; the agent is the only user here.
disable_created_metrics()


class AgentMetrics:
    """`herdsman_event_duration_seconds{event, outcome}` (its `_count` is events handled) and
    `process_*` (the agent's CPU, memory, open files)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        ProcessCollector(registry=self.registry)
        self.duration = Histogram(
            "herdsman_event_duration_seconds",
            "Controller events handled, from arrival to outcome (including waits for the same VM)",
            ("event", "outcome"), buckets=EVENT_BUCKETS, registry=self.registry)

    def event_handled(self, event: str, outcome: str, seconds: float) -> None:
        """The dispatcher's `on_outcome` hook."""
        self.duration.labels(event, outcome).observe(seconds)

    def families(self) -> list[Metric]:
        return list(self.registry.collect())


class ControllerView(Protocol):
    @property
    def connected(self) -> bool: ...
    connection_attempts: int
    subscriptions: int


class StreamView(Protocol):
    opened: Mapping[str, int]
    active: Mapping[str, int]
    refused: Mapping[int, int]


class ImageView(Protocol):
    lookups: Mapping[tuple[str, str], int]

    def cached_bytes(self) -> int: ...


@dataclass(frozen=True)
class AgentState:
    """What a scrape reports about the agent itself, copied at one moment."""

    libvirt_up: bool = False
    vm_stats_seconds: float = 0.0
    controller_connected: bool | None = None
    controller_attempts: int = 0
    controller_subscriptions: int = 0
    streams_opened: dict[str, int] = field(default_factory=dict)
    streams_active: dict[str, int] = field(default_factory=dict)
    streams_refused: dict[int, int] = field(default_factory=dict)
    image_lookups: dict[tuple[str, str], int] = field(default_factory=dict)
    image_bytes: int | None = None


def read_state(*, libvirt_up: bool, vm_stats_seconds: float, controller: ControllerView | None,
               streams: StreamView | None, images: ImageView | None, image_bytes: int | None) -> AgentState:
    """Copy the live counters (call it on the event loop, where they change)."""
    return AgentState(
        libvirt_up=libvirt_up,
        vm_stats_seconds=vm_stats_seconds,
        controller_connected=None if controller is None else controller.connected,
        controller_attempts=0 if controller is None else controller.connection_attempts,
        controller_subscriptions=0 if controller is None else controller.subscriptions,
        streams_opened=dict(streams.opened) if streams else {},
        streams_active=dict(streams.active) if streams else {},
        streams_refused=dict(streams.refused) if streams else {},
        image_lookups=dict(images.lookups) if images else {},
        image_bytes=image_bytes,
    )


def state_families(state: AgentState, stream_kinds: tuple[str, ...] = ()) -> list[Metric]:
    info = GaugeMetricFamily("herdsman_agent_info", "The agent's version (value 1)", labels=("version",))
    info.add_metric((__version__,), 1)
    up = GaugeMetricFamily("herdsman_libvirt_up", "1 when libvirt answered this scrape's stats call",
                           value=int(state.libvirt_up))
    stats_time = GaugeMetricFamily("herdsman_vm_stats_duration_seconds",
                                   "How long this scrape's one stats call to libvirt took",
                                   value=state.vm_stats_seconds)
    families: list[Metric] = [info, up, stats_time]
    if state.controller_connected is not None:
        families += [
            GaugeMetricFamily("herdsman_controller_connected", "1 while subscribed to the controller's events",
                              value=int(state.controller_connected)),
            CounterMetricFamily("herdsman_controller_connection_attempts",
                                "Subscription attempts (the first, then each reconnect)",
                                value=state.controller_attempts),
            CounterMetricFamily("herdsman_controller_subscriptions",
                                "Subscriptions the controller accepted; more than one means reconnects",
                                value=state.controller_subscriptions),
        ]
    opened = CounterMetricFamily("herdsman_stream_connections", "Stream connections opened (console, exec, logs, proxy)",
                                 labels=("kind",))
    active = GaugeMetricFamily("herdsman_stream_connections_open", "Stream connections open now", labels=("kind",))
    for kind in sorted(set(stream_kinds) | set(state.streams_opened)):
        opened.add_metric((kind,), state.streams_opened.get(kind, 0))
        active.add_metric((kind,), state.streams_active.get(kind, 0))
    refused = CounterMetricFamily("herdsman_stream_refused", "Stream handshakes refused, by HTTP status",
                                  labels=("status",))
    for status, count in sorted(state.streams_refused.items()):
        refused.add_metric((str(status),), count)
    lookups = CounterMetricFamily("herdsman_image_cache_requests",
                                  "Boot image requests: a hit was cached, a miss fetched it (or joined a fetch)",
                                  labels=("kind", "result"))
    for kind in ("disk", "kernel"):
        for result in ("hit", "miss"):
            lookups.add_metric((kind, result), state.image_lookups.get((kind, result), 0))
    families += [opened, active, refused, lookups]
    if state.image_bytes is not None:
        families.append(GaugeMetricFamily("herdsman_image_cache_bytes", "Disk space the cached boot images use",
                                          value=state.image_bytes))
    return families
