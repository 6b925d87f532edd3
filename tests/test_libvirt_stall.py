"""A libvirtd that accepts and never answers must not stop the agent: pings, the event loop and
the systemd watchdog go on, operations fail in bounded time with a clear error, and the agent
reconnects once libvirtd answers again.

The agent talks to the real libvirtd through a proxy the test freezes (tests/unix_proxy.py).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.agent_harness import instance_event, ping, running_agent, vm_instance
from tests.libvirtd_fixtures import host_dirs, needs_libvirtd, system_conn  # noqa: F401 - fixtures
from tests.unix_proxy import UnixProxy

pytestmark = [pytest.mark.libvirtd, needs_libvirtd, pytest.mark.timeout(300)]


@pytest.fixture
def proxy(tmp_path: Path) -> Iterator[UnixProxy]:
    p = UnixProxy(tmp_path / "libvirt-sock")
    p.listen()
    yield p
    p.stop()


class LoopWatch:
    """The longest the event loop went without running a 20 ms ticker."""

    def __init__(self) -> None:
        self.worst = 0.0
        self._task: asyncio.Task[None] | None = None

    async def _tick(self) -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(0.02)
            now = time.monotonic()
            self.worst = max(self.worst, now - last - 0.02)
            last = now

    def __enter__(self) -> "LoopWatch":
        self._task = asyncio.get_running_loop().create_task(self._tick())
        return self

    def __exit__(self, *_: object) -> None:
        assert self._task is not None
        self._task.cancel()


async def test_a_hung_libvirtd_does_not_stop_pings(tmp_path: Path, proxy: UnixProxy, host_dirs: dict) -> None:
    uri = f"qemu+unix:///system?socket={proxy.path}"
    async with running_agent(tmp_path, uri=uri, libvirt_timeout=4, **host_dirs) as (ctl, agent):
        assert "hostUuid" in {r["type"] for r in (await ping(ctl))["data"]["resources"]}
        proxy.freeze()
        with LoopWatch() as loop:
            # pings answer at once: the host part never waits for libvirt...
            started = time.monotonic()
            light = await ping(ctl, instances=False)
            assert time.monotonic() - started < 2
            assert {r["type"] for r in light["data"]["resources"]} >= {"host", "physicalHost"}
            # ...the instance list comes from what the agent knows (libvirt's events and its last
            # full read a few seconds ago)...
            started = time.monotonic()
            full = await ping(ctl)
            assert time.monotonic() - started < 2
            assert "hostUuid" in {r["type"] for r in full["data"]["resources"]}
            # an operation fails in bounded time, with a message that says why
            started = time.monotonic()
            reply = await instance_event(ctl, "activate", vm_instance("stalled"), timeout=60)
            assert reply["transitioning"] == "error"
            assert "libvirt" in reply["transitioningMessage"]
            assert time.monotonic() - started < 30
            # ...until the liveness probe gives the connection up: then the list is left out
            # (never sent empty: Cattle would take that for "every VM is gone")
            deadline = time.monotonic() + 60
            while agent.driver.available:
                assert time.monotonic() < deadline, "the liveness probe never noticed the hung daemon"
                started = time.monotonic()
                await ping(ctl, instances=False)
                assert time.monotonic() - started < 2
                await asyncio.sleep(0.5)
            full = await ping(ctl)
            assert "hostUuid" not in {r["type"] for r in full["data"]["resources"]}
            assert full["data"]["options"] == {}
        assert loop.worst < 0.5, f"the event loop stalled for {loop.worst:.2f} s"
        proxy.restore()
        deadline = time.monotonic() + 60
        while "hostUuid" not in {r["type"] for r in (await ping(ctl))["data"]["resources"]}:
            assert time.monotonic() < deadline, "the agent did not come back to libvirt"
            await asyncio.sleep(0.5)
