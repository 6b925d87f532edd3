"""Telling the agent's own lifecycle events from changes on the host, when libvirt delivers
them after the operation that caused them has finished."""

from __future__ import annotations

import time

from drivers.libvirt.own_events import OwnEvents


def test_a_graceful_stop_is_one_event_whichever_way_it_ends() -> None:
    own = OwnEvents()
    own.expect("vm", "stop", "die")
    assert own.consume("vm", "die")
    assert not own.consume("vm", "stop")  # a second stop is not ours: the VM was already stopped


def test_a_restarts_stop_event_arriving_after_its_start_is_still_its_own() -> None:
    own = OwnEvents()
    own.expect("vm", "stop", "die")
    own.expect_next("vm", "start")
    assert own.consume("vm", "start")
    assert own.consume("vm", "die")
    assert not own.consume("vm", "die")  # a crash after the restart is reported


def test_a_new_operation_drops_what_the_last_one_left_unused() -> None:
    own = OwnEvents()
    own.expect("vm", "stop", "die")
    own.expect("vm", "start")  # the stop found the VM stopped already: no event came
    assert own.consume("vm", "start")
    assert not own.consume("vm", "die")
    own.expect("vm", "start")
    own.expect("vm")  # the start did not happen
    assert not own.consume("vm", "start")


def test_an_expected_event_that_never_came_expires() -> None:
    own = OwnEvents(window=0.01)
    own.expect("vm", "start")
    time.sleep(0.02)
    assert not own.consume("vm", "start")
    assert not own.consume("other", "start")
