"""Host events reach the controller in the order they happened, for each VM, even when a post
has to be retried (agent/protocol/container_events.py), through the real client and the double."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import pytest

from agent.protocol.client import ControllerClient
from agent.protocol.container_events import ContainerEventSender
from tests.controller_double import ControllerDouble


def _event(vm: str, status: str, ts: int) -> dict[str, object]:
    return {"externalId": vm, "externalStatus": status, "externalTimestamp": ts, "reportedHostUuid": "h"}


@pytest.fixture
async def sending() -> AsyncIterator[tuple[ControllerDouble, ContainerEventSender]]:
    ctl = ControllerDouble()
    await ctl.start()
    client = ControllerClient(ctl.url, ctl.access_key, ctl.secret_key, event_names=["ping"])
    sender = ContainerEventSender(client.post_container_event, logging.getLogger("test"))
    try:
        yield ctl, sender
    finally:
        await sender.close()
        await client.aclose()
        await ctl.stop()


async def test_a_retried_die_still_arrives_before_the_start_that_followed_it(sending: tuple[ControllerDouble, ContainerEventSender]) -> None:
    ctl, sender = sending
    ctl.container_event_answers = [503]  # the die is refused once and retried after a backoff
    sender.send(_event("vm-1", "die", 1))
    sender.send(_event("vm-1", "start", 2))  # a policy restart, right after
    await ctl.wait_container_event(lambda e: e["externalStatus"] == "start", timeout=10)
    assert [e["externalStatus"] for e in ctl.container_events] == ["die", "start"]


async def test_one_vms_retries_do_not_hold_back_another_vm(sending: tuple[ControllerDouble, ContainerEventSender]) -> None:
    ctl, sender = sending
    ctl.container_event_answers = [503]  # vm-1's die, retried after ≥ 0.1 s
    sender.send(_event("vm-1", "die", 1))
    for _ in range(100):
        if ctl.container_event_attempts:
            break
        await asyncio.sleep(0.01)
    sender.send(_event("vm-2", "stop", 1))
    await ctl.wait_container_event(lambda e: e["externalId"] == "vm-1", timeout=10)
    assert [e["externalId"] for e in ctl.container_events] == ["vm-2", "vm-1"]


async def test_a_refused_post_is_logged_and_the_next_one_goes_out(sending: tuple[ControllerDouble, ContainerEventSender],
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    ctl, sender = sending
    ctl.container_event_answers = [400]  # refused for good: not retried
    sender.send(_event("vm-1", "die", 1))
    sender.send(_event("vm-1", "start", 2))
    await ctl.wait_container_event(lambda e: e["externalStatus"] == "start", timeout=10)
    assert [e["externalStatus"] for e in ctl.container_events] == ["start"]
    assert any(r.getMessage() == "could not report host event" for r in caplog.records)


async def test_close_drops_what_is_not_posted_yet(sending: tuple[ControllerDouble, ContainerEventSender]) -> None:
    ctl, sender = sending
    ctl.container_event_answers = [503] * 20
    sender.send(_event("vm-1", "die", 1))
    sender.send(_event("vm-1", "start", 2))
    await asyncio.sleep(0.1)
    await asyncio.wait_for(sender.close(), 2)  # the fixture's close finds nothing left
    assert ctl.container_events == []
    # the die may have been retried meanwhile; the start, waiting behind it, never went out
    assert {e["externalStatus"] for e in ctl.container_event_attempts} == {"die"}
