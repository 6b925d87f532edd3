"""The health state machine, walked exhaustively: every reachable tracker, every input."""

from __future__ import annotations

import itertools

import pytest

from agent.health import state as m
from agent.health.state import Health, Thresholds, Tracker, Transition
from agent.spec.policies import InstanceHealthCheck

H, U, I, R = Health.HEALTHY, Health.UNHEALTHY, Health.INITIALIZING, Health.REINITIALIZING
NO_TIMEOUTS = dict(initializing_timeout=None, reinitializing_timeout=None)


def run(results: list[bool], limits: Thresholds, *, resumed: bool = False) -> tuple[Tracker, list[Transition]]:
    tracker = m.begin(0.0, resumed=resumed)
    transitions = []
    for t, passed in enumerate(results, 1):
        tracker, transition = m.observe(tracker, limits, passed, float(t))
        if transition is not None:
            transitions.append(transition)
    return tracker, transitions


def trailing(results: list[bool], value: bool) -> int:
    count = 0
    for result in reversed(results):
        if result is not value:
            break
        count += 1
    return count


@pytest.mark.parametrize(("rise", "fall", "resumed"), list(itertools.product((1, 2, 3), (1, 2, 3), (False, True))))
def test_every_result_sequence_up_to_eight_probes(rise: int, fall: int, resumed: bool) -> None:
    limits = Thresholds(rise, fall, **NO_TIMEOUTS)
    for length in range(9):
        for results in itertools.product((True, False), repeat=length):
            seq = list(results)
            tracker, transitions = run(seq, limits, resumed=resumed)
            ever_healthy = any(trailing(seq[:n], True) >= rise for n in range(length + 1))
            # rise passes in a row make it healthy, from any state
            if trailing(seq, True) >= rise:
                assert tracker.state is H, seq
            # fall failures in a row make it unhealthy once it was healthy (or was adopted running)
            elif trailing(seq, False) >= fall and (ever_healthy or resumed):
                assert tracker.state is U, seq
            # a fresh VM that never passed rise times in a row is still initializing
            if not ever_healthy and not resumed:
                assert tracker.state is I and transitions == [], seq
            # each transition changes the state, alternates, and reports the new state
            for before, after in zip(transitions, transitions[1:]):
                assert before.current is after.previous and before.current is not after.current
            for transition in transitions:
                assert transition.reason == "probe"
                assert transition.report == {H: "UP", U: "DOWN"}[transition.current]
            # and happens exactly when the run of equal results reaches its threshold
            for transition in transitions:
                upto = seq[: int(transition.at)]
                if transition.current is H:
                    assert trailing(upto, True) == rise
                else:
                    assert trailing(upto, False) == fall


def all_trackers(limits: Thresholds) -> list[Tracker]:
    return [Tracker(state, 0.0, passes, failures, resumed)
            for state in Health for passes in range(limits.rise + 1) for failures in range(limits.fall + 1)
            for resumed in (False, True)]


ALLOWED = {
    ("probe", I, H), ("probe", R, H), ("probe", U, H), ("probe", H, U), ("probe", I, U), ("probe", R, U),
    ("timeout", I, U), ("timeout", R, U),
}


@pytest.mark.parametrize(("rise", "fall"), list(itertools.product((1, 2, 4), (1, 3))))
def test_every_tracker_and_input_stays_in_bounds_and_moves_only_along_allowed_edges(rise: int, fall: int) -> None:
    limits = Thresholds(rise, fall, initializing_timeout=5.0, reinitializing_timeout=7.0)
    for tracker, passed, now in itertools.product(all_trackers(limits), (True, False), (1.0, 6.0, 8.0)):
        after, transition = m.observe(tracker, limits, passed, now)
        assert 0 <= after.passes <= rise and 0 <= after.failures <= fall
        assert (after.passes == 0) or (after.failures == 0)
        if transition is None:
            assert after.state is tracker.state and after.since == tracker.since
            continue
        assert (transition.reason, transition.previous, transition.current) in ALLOWED
        assert after.state is transition.current and after.since == now and not after.resumed
        if transition.previous in (I, R) and transition.current is U and transition.reason == "probe":
            assert tracker.resumed and not passed
        if transition.reason == "timeout":
            assert now - tracker.since >= limits.timeout(tracker.state)  # type: ignore[operator]


def test_initializing_times_out_into_unhealthy_and_reports_down() -> None:
    limits = Thresholds(2, 3, initializing_timeout=60.0, reinitializing_timeout=30.0)
    tracker = m.begin(100.0)
    tracker, transition = m.observe(tracker, limits, False, 159.9)
    assert transition is None and tracker.state is I
    tracker, transition = m.observe(tracker, limits, False, 160.0)
    assert transition == Transition(I, U, "timeout", 160.0) and transition.report == "DOWN"
    # probing goes on: rise passes later it is healthy
    tracker, _ = m.observe(tracker, limits, True, 162.0)
    tracker, transition = m.observe(tracker, limits, True, 164.0)
    assert tracker.state is H and transition is not None and transition.report == "UP"


def test_a_pass_that_completes_rise_at_the_timeout_wins() -> None:
    limits = Thresholds(2, 3, initializing_timeout=10.0)
    tracker, _ = m.observe(m.begin(0.0), limits, True, 8.0)
    tracker, transition = m.observe(tracker, limits, True, 10.0)
    assert tracker.state is H and transition is not None and transition.reason == "probe"


def test_no_timeout_means_initializing_for_ever() -> None:
    limits = Thresholds(1, 1, **NO_TIMEOUTS)
    tracker = m.begin(0.0)
    for t in range(1, 1000):
        tracker, transition = m.observe(tracker, limits, False, t * 3600.0)
        assert transition is None
    assert tracker.state is I


def test_restart_goes_to_reinitializing_only_from_healthy_and_reports_nothing() -> None:
    limits = Thresholds(1, 1, initializing_timeout=100.0, reinitializing_timeout=5.0)
    for state, expected in ((H, R), (U, I), (I, I), (R, I)):
        tracker, transition = m.restart(Tracker(state, 0.0, 1, 0, True), 50.0)
        assert tracker == Tracker(expected, 50.0)
        assert transition == Transition(state, expected, "restart", 50.0) and transition.report is None
    tracker, _ = m.restart(Tracker(H, 0.0), 50.0)
    assert m.expire(tracker, limits, 54.9) == (tracker, None)
    expired, transition = m.expire(tracker, limits, 55.0)
    assert expired.state is U and transition == Transition(R, U, "timeout", 55.0)


def test_timeouts_never_touch_healthy_or_unhealthy() -> None:
    limits = Thresholds(1, 1, initializing_timeout=1.0, reinitializing_timeout=1.0)
    for state in (H, U):
        tracker = Tracker(state, 0.0)
        assert m.expire(tracker, limits, 1e9) == (tracker, None)


def test_thresholds_from_the_spec_are_seconds_and_zero_means_never() -> None:
    check = InstanceHealthCheck.model_validate({
        "port": 80, "healthyThreshold": 4, "unhealthyThreshold": 5, "initializingTimeout": 90000,
        "reinitializingTimeout": 0})
    assert Thresholds.of(check) == Thresholds(4, 5, 90.0, None)
    assert Thresholds.of(InstanceHealthCheck.model_validate({"port": 1})) == Thresholds(2, 3, 60.0, 60.0)
