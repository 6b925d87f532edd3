"""The verdict of a migration from the domain's state on both hosts (pure), and the per-host
cap on concurrent outgoing migrations (asyncio)."""

from __future__ import annotations

import asyncio

import libvirt
import pytest

from drivers.libvirt.migration.limits import AlreadyMigrating, MigrationSlots
from drivers.libvirt.migration.outcome import GONE, SideState, decide

RUNNING = SideState(True, libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_RUNNING_MIGRATED)
BOOTED = SideState(True, libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_RUNNING_BOOTED)
PAUSED_MIGRATING = SideState(True, libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PAUSED_MIGRATION)
PAUSED_BY_USER = SideState(True, libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PAUSED_USER)
INCOMING = SideState(True, libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PAUSED_MIGRATION)
SHUTOFF = SideState(True, libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_SHUTOFF_MIGRATED)
SRC_POSTCOPY = SideState(True, libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PAUSED_POSTCOPY)
DST_POSTCOPY = SideState(True, libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_RUNNING_POSTCOPY)
SRC_PC_FAILED = SideState(True, libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PAUSED_POSTCOPY_FAILED)
DST_PC_FAILED = SideState(True, libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_RUNNING_POSTCOPY_FAILED)


@pytest.mark.parametrize(("source", "dest", "verdict"), [
    (GONE, RUNNING, "succeeded"),  # UNDEFINE_SOURCE done
    (SHUTOFF, RUNNING, "succeeded"),  # source stopped, not yet undefined
    (BOOTED, GONE, "failed"),
    (BOOTED, INCOMING, "failed"),  # the destination has not dropped its half yet (network cut)
    (PAUSED_MIGRATING, GONE, "failed"),
    (PAUSED_MIGRATING, INCOMING, "in-progress"),  # switchover
    (PAUSED_MIGRATING, RUNNING, "in-progress"),  # destination resumed, source not yet stopped
    (GONE, INCOMING, "in-progress"),
    (SRC_POSTCOPY, DST_POSTCOPY, "in-progress"),
    (SRC_PC_FAILED, DST_PC_FAILED, "postcopy-failed"),
    (SRC_PC_FAILED, GONE, "postcopy-failed"),
    (BOOTED, RUNNING, "split"),
    (GONE, GONE, "lost"),
    (SHUTOFF, GONE, "lost"),
])
def test_verdict_from_both_hosts(source: SideState, dest: SideState, verdict: str) -> None:
    outcome = decide(source, dest)
    assert outcome.verdict == verdict
    assert outcome.final == (verdict != "in-progress")


def test_a_source_left_paused_by_the_migration_is_to_be_resumed_but_not_one_a_user_paused() -> None:
    assert decide(PAUSED_MIGRATING, GONE).source_paused
    user = decide(PAUSED_BY_USER, GONE)
    assert user.verdict == "failed" and not user.source_paused
    assert decide(BOOTED, GONE).message == "the migration failed; the VM still runs on the source"


async def test_one_slot_runs_one_migration_and_queues_the_rest_in_order() -> None:
    slots = MigrationSlots(1)
    order: list[str] = []
    positions: dict[str, list[int]] = {"b": [], "c": []}
    release = {k: asyncio.Event() for k in "abc"}

    async def migration(key: str) -> None:
        report = positions[key].append if key in positions else None
        async with slots.slot(key, on_queued=report):
            order.append(key)
            await release[key].wait()

    tasks = [asyncio.create_task(migration(k)) for k in "abc"]
    await asyncio.sleep(0.01)
    assert order == ["a"] and slots.running == {"a"} and slots.queued == ("b", "c")
    assert positions == {"b": [0], "c": [1]}
    release["a"].set()
    await asyncio.sleep(0.01)
    assert order == ["a", "b"] and slots.queued == ("c",) and positions["c"] == [1, 0]
    release["b"].set()
    release["c"].set()
    await asyncio.gather(*tasks)
    assert order == ["a", "b", "c"] and slots.running == frozenset() and slots.queued == ()


async def test_a_vm_holds_one_place_and_a_cancelled_waiter_leaves_the_queue() -> None:
    slots = MigrationSlots(1)
    hold = asyncio.Event()

    async def run(key: str) -> None:
        async with slots.slot(key):
            await hold.wait()

    first = asyncio.create_task(run("a"))
    waiting = asyncio.create_task(run("b"))
    await asyncio.sleep(0.01)
    with pytest.raises(AlreadyMigrating):
        async with slots.slot("a"):
            pass
    with pytest.raises(AlreadyMigrating):
        async with slots.slot("b"):
            pass
    waiting.cancel()
    await asyncio.sleep(0.01)
    assert slots.queued == ()
    third = asyncio.create_task(run("c"))
    await asyncio.sleep(0.01)
    assert slots.queued == ("c",)
    hold.set()
    await asyncio.gather(first, third)
    assert slots.running == frozenset()


async def test_raising_the_limit_starts_queued_migrations_at_once() -> None:
    slots = MigrationSlots(1)
    hold = asyncio.Event()
    started: list[str] = []

    async def run(key: str) -> None:
        async with slots.slot(key):
            started.append(key)
            await hold.wait()

    tasks = [asyncio.create_task(run(k)) for k in "abc"]
    await asyncio.sleep(0.01)
    assert started == ["a"]
    slots.set_limit(3)
    await asyncio.sleep(0.01)
    assert started == ["a", "b", "c"]
    hold.set()
    await asyncio.gather(*tasks)
    with pytest.raises(ValueError):
        MigrationSlots(0)


async def test_a_turn_that_comes_as_the_waiter_is_cancelled_is_passed_on() -> None:
    slots = MigrationSlots(1)
    gate = asyncio.Event()
    entered: list[str] = []

    async def run(key: str) -> None:
        async with slots.slot(key):
            entered.append(key)
            await gate.wait()

    a = asyncio.create_task(run("a"))
    b = asyncio.create_task(run("b"))
    c = asyncio.create_task(run("c"))
    await asyncio.sleep(0.01)
    gate.set()
    b.cancel()  # b's turn comes in the same loop iteration as its cancellation
    await asyncio.gather(a, c, return_exceptions=True)
    assert entered in (["a", "c"], ["a", "b", "c"])
    assert slots.running == frozenset() and slots.queued == ()
