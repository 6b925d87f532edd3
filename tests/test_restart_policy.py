"""The restart policy: the pure decision, the stored record, the causes libvirt gives, and the
runner on real test-driver domains."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import AsyncIterator

import libvirt
import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.restarts.policy import FIRST_DELAY, MAX_DELAY, backoff, decide
from agent.restarts.record import RecordError, RestartRecord, dumps, loads
from agent.restarts.runner import RestartRunner
from agent.spec.policies import RestartPolicy
from drivers.libvirt.events import shutoff_cause, to_lifecycle_event

from tests.restart_target import LibvirtTestTarget

pytestmark = pytest.mark.timeout(60)
V = libvirt
CAUSES = ("poweroff", "crashed", "failed", "killed", "lost")


def policy(name: str, retries: int = 0) -> RestartPolicy:
    return RestartPolicy.model_validate({"name": name, **({"maximumRetryCount": retries} if retries else {})})


# -- the decision ------------------------------------------------------------------------------

@pytest.mark.parametrize(("name", "cause", "restart"), [
    *[("no", cause, False) for cause in CAUSES],
    *[("always", cause, True) for cause in CAUSES],
    *[("unless-stopped", cause, True) for cause in CAUSES],
    ("on-failure", "poweroff", False),
    *[("on-failure", cause, True) for cause in CAUSES if cause != "poweroff"],
])
def test_which_policy_restarts_after_which_cause(name: str, cause: str, restart: bool) -> None:
    decision = decide(policy(name), RestartRecord(), cause, 1000.0)  # type: ignore[arg-type]
    assert decision.restart is restart
    if restart:
        assert decision.delay == FIRST_DELAY
        assert decision.record == RestartRecord(1, FIRST_DELAY, 1000.0 + FIRST_DELAY, pending=True)
    else:
        assert decision.record == RestartRecord()


def test_no_policy_at_all_is_no() -> None:
    assert not decide(None, RestartRecord(), "crashed", 0.0).restart


@pytest.mark.parametrize(("name", "cause"), list(itertools.product(("always", "unless-stopped", "on-failure"), CAUSES)))
def test_a_vm_the_controller_stopped_is_never_restarted(name: str, cause: str) -> None:
    decision = decide(policy(name), RestartRecord.stopped(), cause, 0.0)  # type: ignore[arg-type]
    assert not decision.restart and decision.reason == "the controller stopped it"


def test_on_failure_honours_maximum_retry_count() -> None:
    limit = policy("on-failure", 3)
    record, now, restarts = RestartRecord(), 0.0, 0
    for _ in range(10):
        decision = decide(limit, record, "crashed", now)
        if decision.restart:
            restarts += 1
            record = decision.record
        now += 60.0  # each run lasted a minute: the delay resets, the count does not
    assert restarts == 3 and record.restart_count == 3
    assert decide(limit, record, "crashed", now).reason == "maximumRetryCount 3 reached"
    assert decide(policy("on-failure"), RestartRecord(restart_count=10_000), "crashed", now).restart, "0: no limit"


def test_backoff_is_dockers_doubling_from_100_ms_capped_and_reset_after_10_s_of_running() -> None:
    always, record, now, delays = policy("always"), RestartRecord(), 0.0, []
    for _ in range(16):
        decision = decide(always, record, "killed", now)
        delays.append(decision.delay)
        record = decision.record
        now = record.last_restart + 1.0  # type: ignore[operator]  # dies 1 s after each start
    assert delays[:12] == [0.1 * 2 ** n for n in range(12)] and delays[12:] == [MAX_DELAY] * 4
    assert backoff(record, record.last_restart + 9.99) == MAX_DELAY  # type: ignore[operator]
    assert backoff(record, record.last_restart + 10.0) == FIRST_DELAY  # type: ignore[operator]
    assert record.restart_count == 16


# -- the record ----------------------------------------------------------------------------------

@given(st.builds(RestartRecord, st.integers(0, 10**9), st.floats(0, 1e6),
                 st.none() | st.floats(0, 4e9), st.booleans(), st.booleans()))
def test_records_survive_the_round_trip(record: RestartRecord) -> None:
    assert loads(dumps(record)) == record


@pytest.mark.parametrize(("text", "reason"), [
    ("", "not JSON"),
    ("[]", "format"),
    ('{"format": 2}', "format 2 is not 1"),
    ('{"format": 1, "restartCount": -1}', "restartCount -1"),
    ('{"format": 1, "restartCount": true}', "restartCount True"),
    ('{"format": 1, "lastDelay": "1"}', "lastDelay"),
    ('{"format": 1, "lastRestart": NaN}', "lastRestart"),
    ('{"format": 1, "pending": 1}', "true or false"),
    ('{"format": 1, "stoppedByController": "yes"}', "true or false"),
    ('{"format": 1, "extra": 1}', "unknown fields ['extra']"),
])
def test_a_record_that_cannot_be_read_is_refused_not_guessed(text: str, reason: str) -> None:
    with pytest.raises(RecordError) as caught:
        loads(text)
    assert reason in str(caught.value)


# -- the causes libvirt gives --------------------------------------------------------------------

@pytest.mark.parametrize(("event", "detail", "cause"), [
    (V.VIR_DOMAIN_EVENT_SHUTDOWN, V.VIR_DOMAIN_EVENT_SHUTDOWN_FINISHED, "poweroff"),
    (V.VIR_DOMAIN_EVENT_SHUTDOWN, V.VIR_DOMAIN_EVENT_SHUTDOWN_GUEST, "poweroff"),
    (V.VIR_DOMAIN_EVENT_SHUTDOWN, V.VIR_DOMAIN_EVENT_SHUTDOWN_HOST, None),
    (V.VIR_DOMAIN_EVENT_STOPPED, V.VIR_DOMAIN_EVENT_STOPPED_SHUTDOWN, "poweroff"),
    (V.VIR_DOMAIN_EVENT_STOPPED, V.VIR_DOMAIN_EVENT_STOPPED_DESTROYED, "killed"),
    (V.VIR_DOMAIN_EVENT_STOPPED, V.VIR_DOMAIN_EVENT_STOPPED_CRASHED, "crashed"),
    (V.VIR_DOMAIN_EVENT_STOPPED, V.VIR_DOMAIN_EVENT_STOPPED_FAILED, "failed"),
    (V.VIR_DOMAIN_EVENT_STOPPED, V.VIR_DOMAIN_EVENT_STOPPED_SAVED, None),
    (V.VIR_DOMAIN_EVENT_STOPPED, V.VIR_DOMAIN_EVENT_STOPPED_MIGRATED, None),
    (V.VIR_DOMAIN_EVENT_STOPPED, V.VIR_DOMAIN_EVENT_STOPPED_FROM_SNAPSHOT, None),
    (V.VIR_DOMAIN_EVENT_CRASHED, V.VIR_DOMAIN_EVENT_CRASHED_PANICKED, None),
    (V.VIR_DOMAIN_EVENT_STARTED, V.VIR_DOMAIN_EVENT_STARTED_BOOTED, None),
])
def test_lifecycle_events_carry_the_cause_the_policy_needs(event: int, detail: int, cause: str | None) -> None:
    assert to_lifecycle_event("u", "n", event, detail, 0.0).cause == cause


def test_a_shut_off_domain_found_at_adoption_gets_its_cause_from_the_state_reason() -> None:
    assert [shutoff_cause(getattr(V, f"VIR_DOMAIN_SHUTOFF_{name}")) for name in (
        "UNKNOWN", "SHUTDOWN", "DESTROYED", "CRASHED", "MIGRATED", "SAVED", "FAILED", "FROM_SNAPSHOT", "DAEMON",
    )] == ["lost", "poweroff", "killed", "crashed", None, None, "failed", None, "lost"]
    assert shutoff_cause(99) == "lost"


# -- the runner on test-driver domains -----------------------------------------------------------

@pytest.fixture
async def target() -> AsyncIterator[LibvirtTestTarget]:
    driver = LibvirtTestTarget()
    yield driver
    driver.close()


async def wait_running(target: LibvirtTestTarget, uuid: str, timeout: float = 5.0) -> float:
    async with asyncio.timeout(timeout):
        while not target.running(uuid):
            await asyncio.sleep(0.005)
    return time.monotonic()


async def test_a_killed_vm_is_restarted_with_doubling_backoff(target: LibvirtTestTarget) -> None:
    restarted: list[str] = []
    runner = RestartRunner(target, on_restarted=restarted.append)
    uuid = target.create({"name": "always"})
    try:
        delays = []
        for n in range(4):
            cause = target.kill(uuid)
            killed = time.monotonic()
            runner.stopped(uuid, cause, time.time())
            runner.stopped(uuid, cause, time.time())  # libvirt says some stops twice
            delays.append(await wait_running(target, uuid) - killed)
            await asyncio.sleep(0.05)
    finally:
        await runner.close()
    assert cause == "killed"
    for n, delay in enumerate(delays):
        assert 0.1 * 2 ** n <= delay <= 0.1 * 2 ** n + 0.3, delays
    assert restarted == [uuid] * 4 and target.starts == [uuid] * 4
    record = target.record(uuid)
    assert record is not None and (record.restart_count, record.last_delay, record.pending) == (4, 0.8, False)


async def test_on_failure_stops_after_maximum_retry_count_and_logs_why(target: LibvirtTestTarget,
                                                                         caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="herdsman.restarts")
    runner = RestartRunner(target)
    uuid = target.create({"name": "on-failure", "maximumRetryCount": 2})
    try:
        for _ in range(2):
            runner.stopped(uuid, target.kill(uuid), time.time())
            await wait_running(target, uuid)
            await asyncio.sleep(0.02)
        runner.stopped(uuid, target.kill(uuid), time.time())
        await asyncio.sleep(0.5)
    finally:
        await runner.close()
    assert not target.running(uuid) and len(target.starts) == 2
    assert target.record(uuid).restart_count == 2  # type: ignore[union-attr]
    [refusal] = [r for r in caplog.records if r.getMessage() == "not restarting a stopped VM"]
    assert refusal.levelname == "WARNING" and refusal.reason == "maximumRetryCount 2 reached"  # type: ignore[attr-defined]


@pytest.mark.parametrize(("spec", "cause"), [({"name": "no"}, "killed"), (None, "crashed"),
                                             ({"name": "on-failure"}, "poweroff")])
async def test_policies_that_leave_it_stopped(target: LibvirtTestTarget, spec: dict | None, cause: str) -> None:
    runner = RestartRunner(target)
    uuid = target.create(spec)
    try:
        target.kill(uuid)
        runner.stopped(uuid, cause, time.time())  # type: ignore[arg-type]
        await asyncio.sleep(0.4)
    finally:
        await runner.close()
    assert not target.running(uuid) and target.record(uuid) == RestartRecord()


async def test_a_controller_stop_is_never_undone_even_during_the_backoff(target: LibvirtTestTarget) -> None:
    runner = RestartRunner(target)
    stopped_first = target.create({"name": "always"})
    stopped_during = target.create({"name": "always"}, RestartRecord(3, 51.2, time.time() - 1.0))
    try:
        await target.controller_stop(stopped_first)
        runner.stopped(stopped_first, "killed", time.time())
        runner.stopped(stopped_during, target.kill(stopped_during), time.time())  # backoff 102.4 s
        await asyncio.sleep(0.1)
        assert runner.waiting == {stopped_during}
        assert target.record(stopped_during).pending  # type: ignore[union-attr]
        await target.controller_stop(stopped_during)
        runner.cancel(stopped_during)
        await asyncio.sleep(0.2)
    finally:
        await runner.close()
    assert not target.running(stopped_first) and not target.running(stopped_during)
    assert target.record(stopped_during) == RestartRecord.stopped() == target.record(stopped_first)
    assert target.starts == []


async def test_a_runner_that_lost_the_race_with_the_controller_starts_nothing(target: LibvirtTestTarget) -> None:
    runner = RestartRunner(target)
    uuid = target.create({"name": "always"})
    try:
        runner.stopped(uuid, target.kill(uuid), time.time())
        await target.controller_stop(uuid)  # lands after the decision, before the 100 ms are up
        await asyncio.sleep(0.4)
    finally:
        await runner.close()
    assert not target.running(uuid) and target.starts == [] and target.record(uuid) == RestartRecord.stopped()


async def test_an_agent_killed_during_the_backoff_does_the_restart_once_when_it_is_back(
        target: LibvirtTestTarget) -> None:
    uuid = target.create({"name": "on-failure", "maximumRetryCount": 1}, RestartRecord())
    first = RestartRunner(target)
    first.stopped(uuid, target.kill(uuid), time.time())
    await asyncio.sleep(0.03)  # decided and written down, still waiting its 100 ms
    pending = target.record(uuid)
    assert pending is not None and pending.pending and pending.restart_count == 1
    await first.close()  # the agent dies: nothing of it runs any more
    assert not target.running(uuid)

    second = RestartRunner(target)  # the agent is back and adopts what it finds
    try:
        second.adopt(uuid, shutoff_cause(target.dom(uuid).state()[1]))
        await wait_running(target, uuid)
        await asyncio.sleep(0.05)
        assert target.record(uuid) == RestartRecord(1, 0.1, pending.last_restart, False)
        # the one retry is used up: the next failure leaves it down, across the restart too
        second.stopped(uuid, target.kill(uuid), time.time())
        await asyncio.sleep(0.3)
    finally:
        await second.close()
    assert not target.running(uuid) and target.starts == [uuid]


async def test_adoption_clears_a_pending_mark_left_on_a_vm_that_did_start_and_leaves_old_domains_alone(
        target: LibvirtTestTarget) -> None:
    started = target.create({"name": "always"}, RestartRecord(1, 0.1, time.time() - 5, pending=True))
    legacy = target.create({"name": "always"}, record=None)
    lost = target.create({"name": "always"})
    target.kill(legacy)
    target.dom(lost).destroy()
    runner = RestartRunner(target)
    try:
        runner.adopt(started, None)
        runner.adopt(legacy, "lost")
        runner.adopt(lost, "lost")  # e.g. found shut off after a host reboot
        await wait_running(target, lost)
        await asyncio.sleep(0.1)
    finally:
        await runner.close()
    assert target.record(started) == RestartRecord(1, 0.1, target.record(started).last_restart, False)  # type: ignore[union-attr]
    assert not target.running(legacy) and target.record(legacy) is None
    assert target.starts == [lost]
