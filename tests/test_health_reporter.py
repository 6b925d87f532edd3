"""Health reports through the real controller client to the controller double's /serviceevents."""

from __future__ import annotations

import argparse
import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from agent.config import ConfigError, add_arguments, load_config
from agent.health.monitor import HealthMonitor
from agent.health.reporter import HealthReporter, client_post, healthcheck_uuid
from agent.protocol.client import ControllerClient, basic_auth
from agent.spec.policies import InstanceHealthCheck

from tests.controller_double import ControllerDouble
from tests.health_target import CheckTarget

pytestmark = pytest.mark.timeout(60)

HOST = "5f1d2c3e-0000-4000-8000-000000000001"
VM = "0b9e6d0a-1111-4111-8111-000000000002"
DELEGATE = ("delegate-key", "delegate-secret")


@pytest.fixture
async def double() -> AsyncIterator[ControllerDouble]:
    controller = ControllerDouble()
    controller.health_keys = DELEGATE
    await controller.start()
    yield controller
    await controller.stop()


@pytest.fixture
async def client(double: ControllerDouble) -> AsyncIterator[ControllerClient]:
    connection = ControllerClient(double.url, double.access_key, double.secret_key, event_names=["ping"],
                                  publish_timeout=2.0)
    yield connection
    await connection.aclose()


def reporter_for(client: ControllerClient, keys: tuple[str, str] = DELEGATE, **options: Any) -> HealthReporter:
    options.setdefault("backoff_initial", 0.1)
    return HealthReporter(client_post(client, basic_auth(*keys)), HOST, **options)


async def until(predicate: Callable[[], Any], timeout: float = 5.0) -> Any:
    async with asyncio.timeout(timeout):
        while not (found := predicate()):
            await asyncio.sleep(0.01)
        return found


async def test_a_report_has_exactly_cattles_three_fields_and_the_health_key(double: ControllerDouble,
                                                                            client: ControllerClient) -> None:
    reporter = reporter_for(client)
    try:
        before = int(time.time())
        reporter.report(VM, 3, "UP")
        await until(lambda: double.service_events)
        after = int(time.time())
        assert reporter.reported(VM) is not None and reporter.pending == 0
    finally:
        await reporter.close()
    [body] = double.service_events
    assert list(body) == ["healthcheckUuid", "reportedHealth", "externalTimestamp"]
    assert body["healthcheckUuid"] == f"{HOST}_{VM}_3" == healthcheck_uuid(HOST, VM, 3)
    assert body["reportedHealth"] == "UP"
    assert type(body["externalTimestamp"]) is int and before <= body["externalTimestamp"] <= after


async def test_403_is_retried_with_doubling_backoff_until_accepted(double: ControllerDouble, client: ControllerClient,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="herdsman.health")
    double.service_event_answers = [403, 403, 409, 503]
    reporter = reporter_for(client)
    try:
        reporter.report(VM, 1, "DOWN")
        await until(lambda: double.service_events and not reporter.pending)  # the reporter saw the 201 too
    finally:
        await reporter.close()
    times = [at for at, _, _ in double.service_event_attempts]
    assert [status for _, status, _ in double.service_event_attempts] == [403, 403, 409, 503, 201]
    gaps = [b - a for a, b in zip(times, times[1:])]
    for n, gap in enumerate(gaps):  # equal jitter: half to all of 0.1 s doubling
        assert 0.1 * 2 ** n * 0.5 - 0.01 <= gap <= 0.1 * 2 ** n + 1.0, gaps  # upper: a loaded machine
    bodies = {str(body) for _, _, body in double.service_event_attempts}
    assert len(bodies) == 1, "a retry sends the same report, timestamp included"
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and warnings[0].status == 403  # type: ignore[attr-defined]
    [recovered] = [r for r in caplog.records if r.getMessage() == "health report accepted after retrying"]
    assert recovered.attempts == 5  # type: ignore[attr-defined]


async def test_the_agents_own_key_is_refused_by_a_cattle_like_controller(double: ControllerDouble,
                                                                         client: ControllerClient) -> None:
    reporter = reporter_for(client, (double.access_key, double.secret_key))
    try:
        reporter.report(VM, 1, "UP")
        await asyncio.sleep(0.5)
        assert double.service_events == [] and reporter.pending == 1
        assert len(double.auth_failures) >= 2, "403 is retried: Cattle says it while creating its rows"
    finally:
        await reporter.close()


async def test_a_newer_state_supersedes_a_pending_retry_and_goes_out_at_once(double: ControllerDouble,
                                                                             client: ControllerClient) -> None:
    double.service_event_answers = [403] * 100
    reporter = reporter_for(client, backoff_initial=30.0)
    try:
        reporter.report(VM, 1, "DOWN")
        await until(lambda: double.service_event_attempts)
        double.service_event_answers.clear()
        reporter.report(VM, 1, "UP")
        started = time.monotonic()
        await until(lambda: double.service_events)
        assert time.monotonic() - started < 1.0, "the newer state does not wait for the old one's backoff"
        await asyncio.sleep(0.2)
    finally:
        await reporter.close()
    assert [b["reportedHealth"] for b in double.service_events] == ["UP"]


async def test_other_refusals_wait_for_the_next_resend(double: ControllerDouble, client: ControllerClient) -> None:
    double.service_event_answers = [400]
    reporter = reporter_for(client, resend_interval=0.5)
    try:
        reporter.report(VM, 1, "UP")
        await until(lambda: double.service_events, timeout=3)
    finally:
        await reporter.close()
    (t0, first, _), (t1, second, _) = double.service_event_attempts[:2]
    assert (first, second) == (400, 201) and 0.44 <= t1 - t0 <= 0.7


async def test_timestamps_never_go_backwards_even_when_the_clock_does(double: ControllerDouble,
                                                                      client: ControllerClient) -> None:
    readings = iter([1_700_000_100.9, 1_700_000_050.0, 1_700_000_100.2, 1_700_000_200.0])
    reporter = reporter_for(client, clock=lambda: next(readings))
    try:
        for health in ("UP", "DOWN", "UP", "DOWN"):
            reporter.report(VM, 1, health)  # type: ignore[arg-type]
            await until(lambda: reporter.pending == 0)
    finally:
        await reporter.close()
    stamps = [b["externalTimestamp"] for b in double.service_events]
    assert stamps == [1_700_000_100, 1_700_000_100, 1_700_000_100, 1_700_000_200]


async def test_the_state_is_resent_periodically_and_on_demand(double: ControllerDouble, client: ControllerClient) -> None:
    reporter = reporter_for(client, resend_interval=0.3)
    try:
        reporter.report(VM, 2, "UP")
        await asyncio.sleep(1.05)
        periodic = len(double.service_events)
        reporter.resend_all()
        await until(lambda: len(double.service_events) > periodic, timeout=0.2)
    finally:
        await reporter.close()
    assert 3 <= periodic <= 5
    assert {b["reportedHealth"] for b in double.service_events} == {"UP"}
    stamps = [b["externalTimestamp"] for b in double.service_events]
    assert stamps == sorted(stamps)


async def test_forget_stops_retries_and_an_unreachable_controller_is_retried(double: ControllerDouble,
                                                                             client: ControllerClient) -> None:
    double.service_event_answers = [503] * 100
    reporter = reporter_for(client)
    try:
        reporter.report(VM, 1, "UP")
        await until(lambda: double.service_event_attempts)
        reporter.forget(VM)
        seen = len(double.service_event_attempts)
        await asyncio.sleep(0.5)
        assert len(double.service_event_attempts) == seen
        double.service_event_answers.clear()
        await double.stop()
        reporter.report(VM, 1, "DOWN")
        await asyncio.sleep(0.4)  # refused connections, retried
        await double.start(double.port or 0)
        await until(lambda: double.service_events, timeout=5)
    finally:
        await reporter.close()
    assert [b["reportedHealth"] for b in double.service_events] == ["DOWN"]


async def test_the_monitor_reports_each_transition_and_nothing_else(double: ControllerDouble,
                                                                    client: ControllerClient) -> None:
    target = await CheckTarget().start()
    reporter = reporter_for(client)
    monitor = HealthMonitor(lambda uuid, port: target.address, listeners=[reporter])
    check = InstanceHealthCheck.model_validate({"port": 80, "interval": 100, "healthyThreshold": 2,
                                                "unhealthyThreshold": 2})
    try:
        monitor.watch(VM, check, start_count=7)
        await until(lambda: double.service_events)
        await target.stop()
        await until(lambda: len(double.service_events) == 2)
        await asyncio.sleep(0.5)
        monitor.unwatch(VM)
        await asyncio.sleep(0.2)
    finally:
        monitor.close()
        await reporter.close()
        await target.stop()
    assert [(b["healthcheckUuid"], b["reportedHealth"]) for b in double.service_events] == [
        (f"{HOST}_{VM}_7", "UP"), (f"{HOST}_{VM}_7", "DOWN")]


def test_health_keys_default_to_the_agents_own_and_go_in_pairs(tmp_path) -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    base = ["--url", "http://cattle:8080/v1", "--access-key", "agent", "--secret-key", "s3cret"]
    assert load_config(parser.parse_args(base), {}).health_keys == ("agent", "s3cret")
    env_file = tmp_path / "herdsman.env"
    env_file.write_text("HERDSMAN_HEALTH_ACCESS_KEY=delegate\nHERDSMAN_HEALTH_SECRET_KEY='d s'\n")
    config = load_config(parser.parse_args([*base, "--config", str(env_file)]), {})
    assert config.health_keys == ("delegate", "d s")
    flags = load_config(parser.parse_args([*base, "--health-access-key", "f", "--health-secret-key", "g"]),
                        {"HERDSMAN_HEALTH_ACCESS_KEY": "e", "HERDSMAN_HEALTH_SECRET_KEY": "e"})
    assert flags.health_keys == ("f", "g")
    with pytest.raises(ConfigError, match="go together"):
        load_config(parser.parse_args([*base, "--health-access-key", "only"]), {})
