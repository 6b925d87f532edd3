"""The probe scheduler and the health monitor on the real clock, against real local services."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, defaultdict

import pytest

from agent.health.monitor import HealthChange, HealthMonitor, probe_spec
from agent.health.probes import ProbeResult
from agent.health.scheduler import NO_ADDRESS, ProbeScheduler, ProbeSpec
from agent.health.state import Health
from agent.spec.policies import InstanceHealthCheck

from tests.health_target import Answer, Blackhole, CheckTarget, closed_port

pytestmark = pytest.mark.timeout(60)


class Recorder:
    """A monitor listener that keeps everything it hears."""

    def __init__(self) -> None:
        self.changes: list[tuple[float, HealthChange]] = []
        self.forgotten: list[str] = []
        self.event = asyncio.Event()

    def health_changed(self, change: HealthChange) -> None:
        self.changes.append((time.monotonic(), change))
        self.event.set()

    def health_forgotten(self, instance_uuid: str) -> None:
        self.forgotten.append(instance_uuid)

    def states(self, uuid: str = "vm") -> list[str]:
        return [str(c.transition.current) for _, c in self.changes if c.instance_uuid == uuid]

    async def wait_for(self, state: Health, uuid: str = "vm", timeout: float = 10.0) -> float:
        """When `uuid` entered `state` (monotonic), waiting for it if needed."""
        async with asyncio.timeout(timeout):
            while True:
                for at, change in self.changes:
                    if change.instance_uuid == uuid and change.transition.current is state:
                        return at
                self.event.clear()
                await self.event.wait()


def check(**fields: object) -> InstanceHealthCheck:
    return InstanceHealthCheck.model_validate({"port": 80, **fields})


# -- the scheduler ---------------------------------------------------------------------------

async def test_first_probes_of_many_vms_are_spread_evenly_over_the_interval() -> None:
    target = await CheckTarget().start()
    first: dict[str, float] = {}

    def address_of(key: str, port: int) -> tuple[str, int]:
        first.setdefault(key, time.monotonic())  # when its first probe starts
        return target.address

    scheduler = ProbeScheduler(address_of, lambda key, result: None)
    try:
        started = time.monotonic()
        for n in range(200):
            scheduler.add(f"vm{n}", ProbeSpec(80, None, interval=3.0, timeout=1.0))
        async with asyncio.timeout(10):
            while len(first) < 200:
                await asyncio.sleep(0.05)
    finally:
        scheduler.close()
        await target.stop()
    # ten 300 ms slices of the interval get about 20 first probes each (a busy machine may
    # stall the loop for a moment, hence the margin)
    slices = Counter(min(9, int((at - started) / 0.3)) for at in first.values())
    assert all(12 <= slices[b] <= 28 for b in range(10)), sorted(slices.items())


async def test_each_vm_is_probed_at_a_fixed_rate() -> None:
    target = await CheckTarget().start()
    times: dict[str, list[float]] = defaultdict(list)
    scheduler = ProbeScheduler(lambda key, port: target.address, lambda key, result: times[key].append(time.monotonic()))
    try:
        for n in range(5):
            scheduler.add(f"vm{n}", ProbeSpec(80, None, interval=0.2, timeout=1.0))
        await asyncio.sleep(2.05)
    finally:
        scheduler.close()
        await target.stop()
    for key, seen in times.items():
        assert 9 <= len(seen) <= 11, (key, len(seen))
        gaps = [b - a for a, b in zip(seen, seen[1:])]
        assert all(0.15 <= gap <= 0.3 for gap in gaps), (key, gaps)


async def test_in_flight_probes_are_bounded_and_a_slow_probe_is_never_overlapped() -> None:
    hole = Blackhole()
    starts: dict[str, list[float]] = defaultdict(list)
    peak = 0

    def address_of(key: str, port: int) -> tuple[str, int]:
        nonlocal peak
        starts[key].append(time.monotonic())
        peak = max(peak, scheduler.in_flight)  # this probe's slot is already taken
        return "127.0.0.1", hole.port

    results: list[ProbeResult] = []
    scheduler = ProbeScheduler(address_of, lambda key, result: results.append(result), max_in_flight=5)
    try:
        for n in range(20):
            scheduler.add(f"vm{n}", ProbeSpec(80, None, interval=0.1, timeout=0.3))
        await asyncio.sleep(2.0)
        assert scheduler.in_flight <= 5
    finally:
        scheduler.close()
        hole.close()
    assert peak == 5
    assert len(starts) == 20, "every VM got its turn"
    assert results and all(not r.ok and "timed out" in r.detail for r in results)
    for seen in starts.values():
        assert all(b - a >= 0.29 for a, b in zip(seen, seen[1:])), seen


async def test_removed_vms_get_no_more_results_and_no_address_is_a_failure() -> None:
    hole = Blackhole()
    results: list[tuple[str, ProbeResult]] = []
    addresses = {"slow": ("127.0.0.1", hole.port), "none": None}
    scheduler = ProbeScheduler(lambda key, port: addresses[key], lambda key, result: results.append((key, result)))
    try:
        scheduler.add("slow", ProbeSpec(80, None, interval=0.1, timeout=5.0))
        scheduler.add("none", ProbeSpec(80, None, interval=0.1, timeout=5.0))
        await asyncio.sleep(0.35)
        assert scheduler.in_flight == 1
        scheduler.remove("slow")
        assert scheduler.in_flight == 0 and "slow" not in scheduler
        await asyncio.sleep(0.2)
    finally:
        scheduler.close()
        hole.close()
    assert [key for key, _ in results if key == "slow"] == []
    assert len(results) >= 3 and all(result == NO_ADDRESS for _, result in results)


def test_probe_spec_from_a_health_check() -> None:
    spec = probe_spec(check(port=8080, interval=5000, responseTimeout=0, requestLine="GET /h HTTP/1.0"))
    assert spec == ProbeSpec(8080, b"GET /h HTTP/1.0\r\n\r\n", 5.0, 5.0)
    assert probe_spec(check(responseTimeout=1500)) == ProbeSpec(80, None, 2.0, 1.5)


# -- the monitor -----------------------------------------------------------------------------

async def test_healthy_after_rise_unhealthy_after_fall_and_back(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="herdsman.health")
    target = await CheckTarget().start()
    recorder = Recorder()
    monitor = HealthMonitor(lambda uuid, port: target.address, listeners=[recorder])
    interval = 0.2
    try:
        watched = time.monotonic()
        monitor.watch("vm", check(interval=200, healthyThreshold=2, unhealthyThreshold=3), start_count=1)
        assert monitor.health("vm") is Health.INITIALIZING
        healthy = await recorder.wait_for(Health.HEALTHY)
        # the first probe of the first VM runs at once; the second, one interval later
        assert interval * 0.75 <= healthy - watched <= interval * 2
        await target.stop()
        stopped = time.monotonic()
        unhealthy = await recorder.wait_for(Health.UNHEALTHY)
        # three failed probes: the third is 2-3 intervals after the service went away
        assert interval * 2 - 0.05 <= unhealthy - stopped <= interval * 3 + 0.25
        await target.start()
        recorder.changes.clear()
        back = time.monotonic()
        assert await recorder.wait_for(Health.HEALTHY) - back <= interval * 2 + 0.25
    finally:
        monitor.close()
        await target.stop()
    assert monitor.health("vm") is Health.HEALTHY
    lines = [r for r in caplog.records if r.getMessage() == "health state changed"]
    assert [(r.previous, r.healthState, r.reported, r.levelname) for r in lines] == [  # type: ignore[attr-defined]
        ("initializing", "healthy", "UP", "INFO"),
        ("healthy", "unhealthy", "DOWN", "WARNING"),
        ("unhealthy", "healthy", "UP", "INFO"),
    ]
    assert "refused" in lines[1].detail and lines[1].check == "tcp" and lines[1].startCount == 1  # type: ignore[attr-defined]


async def test_a_closed_port_never_turns_healthy_and_the_initializing_timeout_is_reported(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="herdsman.health")
    port = closed_port()
    recorder = Recorder()
    monitor = HealthMonitor(lambda uuid, p: ("127.0.0.1", port), listeners=[recorder])
    try:
        watched = time.monotonic()
        monitor.watch("vm", check(interval=100, initializingTimeout=600))
        at = await recorder.wait_for(Health.UNHEALTHY)
        await asyncio.sleep(0.3)
    finally:
        monitor.close()
    assert 0.6 <= at - watched <= 0.95
    [(_, change)] = recorder.changes
    assert change.transition.reason == "timeout" and change.transition.report == "DOWN"
    assert "refused" in change.detail
    [line] = [r for r in caplog.records if r.getMessage() == "health state changed"]
    assert line.levelname == "WARNING" and line.reason == "initializing timeout"  # type: ignore[attr-defined]


async def test_http_check_follows_the_status_code() -> None:
    target = await CheckTarget(answer=Answer(503)).start()
    recorder = Recorder()
    monitor = HealthMonitor(lambda uuid, port: target.address, listeners=[recorder])
    try:
        monitor.watch("vm", check(interval=100, healthyThreshold=1, requestLine='GET "/up" "HTTP/1.1\\r\\nHost: vm"'))
        await asyncio.sleep(0.35)
        assert monitor.health("vm") is Health.INITIALIZING and recorder.changes == []
        target.answer = Answer(204)
        await recorder.wait_for(Health.HEALTHY, timeout=2)
    finally:
        monitor.close()
        await target.stop()
    assert set(target.requests) == {b"GET /up HTTP/1.1\r\nHost: vm\r\n\r\n"}
    assert recorder.changes[-1][1].detail == "HTTP 204"


async def test_watch_is_idempotent_a_new_start_count_reinitializes_and_unwatch_forgets() -> None:
    target = await CheckTarget().start()
    recorder = Recorder()
    monitor = HealthMonitor(lambda uuid, port: target.address, listeners=[recorder])
    spec = check(interval=100, healthyThreshold=1)
    try:
        monitor.watch("vm", spec, start_count=3)
        await recorder.wait_for(Health.HEALTHY, timeout=2)
        for _ in range(3):
            monitor.watch("vm", spec, start_count=3)
        monitor.watch("vm", check(interval=150, healthyThreshold=1), start_count=3)  # changed check: state kept
        assert monitor.health("vm") is Health.HEALTHY
        monitor.watch("vm", spec, start_count=4)
        assert monitor.health("vm") is Health.REINITIALIZING
        await asyncio.sleep(0.3)
        monitor.restarted("vm")
        assert monitor.health("vm") is Health.REINITIALIZING
        monitor.unwatch("vm")
        monitor.unwatch("vm")
        assert monitor.health("vm") is None and monitor.snapshot() == {}
    finally:
        monitor.close()
        await target.stop()
    assert recorder.states() == ["healthy", "reinitializing", "healthy", "reinitializing"]
    assert [c.start_count for _, c in recorder.changes] == [3, 4, 4, 4]
    assert recorder.forgotten == ["vm"]


async def test_a_resumed_vm_goes_unhealthy_after_fall_failures() -> None:
    port = closed_port()
    recorder = Recorder()
    monitor = HealthMonitor(lambda uuid, p: ("127.0.0.1", port), listeners=[recorder])
    try:
        monitor.watch("vm", check(interval=100, unhealthyThreshold=2, initializingTimeout=60000), resumed=True)
        await recorder.wait_for(Health.UNHEALTHY, timeout=2)
    finally:
        monitor.close()
    assert recorder.changes[0][1].transition.reason == "probe"


async def test_failures_of_this_host_do_not_count_against_the_vm(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="herdsman.health")
    recorder = Recorder()
    monitor = HealthMonitor(lambda uuid, port: ("not-an-address", port), listeners=[recorder])
    try:
        monitor.watch("vm", check(interval=100, healthyThreshold=1, unhealthyThreshold=1), resumed=True)
        await asyncio.sleep(0.45)
    finally:
        monitor.close()
    assert monitor.health("vm") is Health.INITIALIZING and recorder.changes == []
    warnings = [r for r in caplog.records if "could not run on this host" in r.getMessage()]
    assert len(warnings) == 1, "warned once, not once per probe"


async def test_a_vm_that_stops_on_its_own_pauses_and_a_restart_reinitializes_it() -> None:
    target = await CheckTarget().start()
    recorder = Recorder()
    monitor = HealthMonitor(lambda uuid, port: target.address, listeners=[recorder])
    spec = check(interval=100, healthyThreshold=1)
    try:
        monitor.watch("vm", spec, start_count=2)
        await recorder.wait_for(Health.HEALTHY, timeout=2)
        monitor.stopped("vm")
        await asyncio.sleep(0.05)  # the service accepts the last probe's connection late
        connections = target.connections
        await asyncio.sleep(0.35)
        assert target.connections == connections, "no probes while it is stopped"
        assert monitor.health("vm") is None and monitor.snapshot() == {}
        assert recorder.forgotten == ["vm"], "its reports stop: the last state is not current any more"
        monitor.restarted("vm")  # the restart policy started it
        assert monitor.health("vm") is Health.REINITIALIZING
        await asyncio.sleep(0.3)
        monitor.stopped("vm")
        monitor.watch("vm", spec, start_count=2)  # found running again (e.g. at the next ping)
        assert monitor.health("vm") is Health.REINITIALIZING
        monitor.stopped("vm")
        monitor.unwatch("vm")
    finally:
        monitor.close()
        await target.stop()
    assert recorder.states() == ["healthy", "reinitializing", "healthy", "reinitializing"]
    assert recorder.forgotten == ["vm"] * 3, "one per stop; unwatching a stopped VM tells nobody again"
