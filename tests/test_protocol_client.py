"""The controller connection, against a real controller double over real sockets."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from agent.protocol import (
    ControllerClient,
    FrameError,
    PublishError,
    make_error_reply,
    make_reply,
    parse_frame,
)

try:
    from tests.controller_double import ControllerDouble
except ModuleNotFoundError:  # tests/ itself is on sys.path (pytest rootdir-less import)
    from controller_double import ControllerDouble  # type: ignore[no-redef]

ROOT = Path(__file__).resolve().parent.parent
EVENTS = ["ping", "compute.instance.activate", "compute.instance.remove"]
# Fast timings so reconnects happen in well under a second.
FAST: dict[str, Any] = dict(ping_interval=0.5, ping_timeout=1.0, backoff_initial=0.05,
                            backoff_cap=0.3, stable_after=5.0, publish_timeout=2.0)


class Agent:
    """The smallest real user of the client: parse, answer, publish in the background."""

    def __init__(self, client: ControllerClient) -> None:
        self.client = client
        self.frames: list[str] = []
        self.connected_calls = 0
        self._tasks: set[asyncio.Task[None]] = set()

    async def on_frame(self, text: str) -> None:
        self.frames.append(text)
        try:
            event = parse_frame(text, max_bytes=self.client.max_frame_bytes)
        except FrameError as err:
            request = err.as_request()
            if request is not None:
                self._spawn(self.client.publish(make_error_reply(request, str(err))))
            return
        if event.replyTo is None:
            return
        if (event.data or {}).get("fail"):
            reply = make_error_reply(event, "cannot start VM", "libvirtError: no space left")
        else:
            reply = make_reply(event, {"instance": {"externalId": f"vm-{event.resourceId}"}})
        self._spawn(self.client.publish(reply))

    async def on_connected(self) -> None:
        self.connected_calls += 1

    def events_named(self, name: str) -> list[dict[str, Any]]:
        return [e for e in map(json.loads, self.frames) if e.get("name") == name]

    def _spawn(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


StartAgent = Callable[..., Awaitable[tuple[Agent, "asyncio.Task[None]"]]]


@pytest.fixture
async def double() -> AsyncIterator[ControllerDouble]:
    controller = ControllerDouble()
    await controller.start()
    yield controller
    await controller.stop()


@pytest.fixture
async def start_agent() -> AsyncIterator[StartAgent]:
    running: list[tuple[ControllerClient, asyncio.Task[None]]] = []

    async def start(url: str, *, secret_key: str = "secret", **options: Any):
        client = ControllerClient(url, "agent", secret_key, event_names=EVENTS,
                                  **{**FAST, **options})
        agent = Agent(client)
        task = asyncio.create_task(client.run(agent.on_frame, agent.on_connected))
        running.append((client, task))
        return agent, task

    yield start
    for client, task in running:
        await client.aclose()
        await asyncio.wait_for(task, 5)


async def eventually(check: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll until `check()` holds; returns the seconds it took."""
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"{what} did not happen within {timeout}s")
        await asyncio.sleep(0.02)
    return time.monotonic() - started


def test_subscribe_url_is_derived_from_cattle_url() -> None:
    def url(base: str) -> str:
        return ControllerClient(base, "a", "s", event_names=["ping", "x;agent=1"]).subscribe_url

    expected = "ws://ctl:8080/v1/subscribe?eventNames=ping&eventNames=x%3Bagent%3D1"
    assert url("http://ctl:8080/v1/schemas") == expected
    assert url("http://ctl:8080/v1/") == expected
    assert url("https://ctl/v1/schemas/").startswith("wss://ctl/v1/subscribe?")
    with pytest.raises(ValueError):
        ControllerClient("ftp://ctl/v1", "a", "s", event_names=["ping"])


async def test_subscribes_with_event_names_and_basic_auth(double, start_agent) -> None:
    agent, _ = await start_agent(double.url + "/schemas")
    await double.wait_subscribed()
    assert double.subscriptions == [EVENTS]
    assert double.auth_failures == []
    await eventually(lambda: agent.connected_calls == 1, 2, "on_connected")
    assert agent.client.connected


async def test_request_gets_a_cattle_shaped_reply(double, start_agent) -> None:
    await start_agent(double.url)
    await double.wait_subscribed()
    reply = await double.request("compute.instance.activate", {"instanceHostMap": {"id": 3}},
                                 resource_type="instanceHostMap", resource_id="1vspm251",
                                 timeout=5)
    assert reply["resourceType"] == "instanceHostMap" and reply["resourceId"] == "1vspm251"
    assert reply["data"] == {"instanceHostMap": {"instance": {"externalId": "vm-1vspm251"}}}
    assert reply["previousNames"] == ["compute.instance.activate"]
    assert reply.get("transitioning") is None


async def test_error_reply_reaches_the_controller(double, start_agent) -> None:
    await start_agent(double.url)
    await double.wait_subscribed()
    reply = await double.request("compute.instance.activate", {"fail": True},
                                 resource_type="instanceHostMap", resource_id="7", timeout=5)
    assert reply["transitioning"] == "error"
    assert reply["transitioningMessage"] == "cannot start VM"
    assert reply["transitioningInternalMessage"] == "libvirtError: no space left"


async def test_frames_are_delivered_in_order(double, start_agent) -> None:
    agent, _ = await start_agent(double.url)
    await double.wait_subscribed()
    for n in range(300):
        await double.send({"name": "compute.instance.force.stop", "id": str(n)})
    await eventually(lambda: len(agent.frames) == 300, 5, "300 frames")
    assert [json.loads(f)["id"] for f in agent.frames] == [str(n) for n in range(300)]


async def test_oversize_frame_is_answered_with_an_error(double, start_agent) -> None:
    agent, _ = await start_agent(double.url, max_frame_bytes=1 << 20,
                                 max_transport_bytes=16 << 20)
    await double.wait_subscribed()
    event = double.make_event("compute.instance.activate", {"blob": "x" * (10 << 20)},
                              resource_type="instanceHostMap", resource_id="9")
    assert await double.send(event) == 1
    reply = await double.wait_reply(event, timeout=10)
    assert reply["transitioning"] == "error"
    assert "too large" in reply["transitioningMessage"]
    assert reply["resourceId"] == "9"
    assert agent.client.connected and len(double.subscriptions) == 1


async def test_frame_beyond_the_transport_limit_drops_and_reconnects(double, start_agent) -> None:
    agent, _ = await start_agent(double.url, max_frame_bytes=64 << 10,
                                 max_transport_bytes=128 << 10)
    await double.wait_subscribed()
    await double.send_raw(json.dumps({"name": "x", "blob": "y" * (1 << 20)}))
    await double.wait_subscribed(count=2, timeout=5)
    await eventually(lambda: agent.connected_calls == 2, 2, "second on_connected")


async def test_keepalive_pings_arrive_without_reply_address(start_agent) -> None:
    controller = ControllerDouble(keepalive_interval=0.1)
    await controller.start()
    try:
        agent, _ = await start_agent(controller.url)
        await eventually(lambda: len(agent.events_named("ping")) >= 3, 3, "3 keepalive pings")
        assert all(p.get("replyTo") is None for p in agent.events_named("ping"))
        assert controller.replies == []
    finally:
        await controller.stop()


async def test_publish_is_stored_and_refusals_raise(double) -> None:
    client = ControllerClient(double.url, "agent", "secret", event_names=EVENTS, **FAST)
    try:
        await client.publish({"id": "1", "name": "reply.42", "previousIds": ["x"], "data": {}})
        await client.post_container_event({"externalId": "vm-1", "externalStatus": "stop"})
        assert double.replies == [{"id": "1", "name": "reply.42", "previousIds": ["x"],
                                   "data": {}}]
        assert double.container_events[0]["externalStatus"] == "stop"
        with pytest.raises(PublishError) as info:
            await client.publish({"name": "compute.instance.activate"})
        assert info.value.status == 403 and "reply" in info.value.body
        assert len(double.replies) == 1
    finally:
        await client.aclose()


async def test_publish_retries_then_fails_when_controller_is_gone(double) -> None:
    client = ControllerClient(double.url, "agent", "secret", event_names=EVENTS, **FAST)
    await double.stop()
    try:
        started = time.monotonic()
        with pytest.raises(PublishError, match="ConnectError") as info:
            await client.publish({"name": "reply.1"})
        assert info.value.status is None
        assert 0.5 < time.monotonic() - started < 5  # three short backoffs, not one try
    finally:
        await client.aclose()


async def test_publish_survives_a_short_controller_restart(double) -> None:
    client = ControllerClient(double.url, "agent", "secret", event_names=EVENTS, **FAST)
    try:
        restart = asyncio.create_task(double.restart(down_for=0.3))
        await asyncio.sleep(0.05)
        await client.publish({"name": "reply.7"})
        await restart
        assert [r["name"] for r in double.replies] == ["reply.7"]
    finally:
        await client.aclose()


async def test_wrong_credentials_keep_retrying_at_the_cap(double, start_agent, caplog) -> None:
    caplog.set_level(logging.INFO, logger="herdsman.protocol")
    _, task = await start_agent(double.url, secret_key="wrong")
    await eventually(lambda: len(double.auth_failures) >= 4, 5, "4 refused subscriptions")
    times = [t for _, t in double.auth_failures]
    assert min(b - a for a, b in itertools.pairwise(times)) >= FAST["backoff_cap"] * 0.9
    assert not task.done() and double.subscriptions == []
    auth_logs = [r for r in caplog.records if "credentials" in r.getMessage()]
    assert auth_logs and auth_logs[0].levelno == logging.ERROR and auth_logs[0].status == 401


async def test_reconnects_after_controller_restart(double, start_agent) -> None:
    agent, _ = await start_agent(double.url)
    await double.wait_subscribed()
    await eventually(lambda: agent.connected_calls == 1, 2, "on_connected")
    await double.restart(down_for=1.0)
    took = await eventually(lambda: len(double.subscriptions) == 2, 5, "resubscription")
    assert took < 1.5
    await eventually(lambda: agent.connected_calls == 2, 2, "on_connected again")
    assert double.subscriptions[1] == EVENTS
    reply = await double.request("compute.instance.remove", resource_type="instanceHostMap",
                                 resource_id="1", timeout=5)
    assert reply["data"] == {"instanceHostMap": {"instance": {"externalId": "vm-1"}}}


async def test_reconnects_after_connections_are_killed(double, start_agent) -> None:
    agent, _ = await start_agent(double.url)
    await double.wait_subscribed()
    await double.kill_connections()
    await double.wait_subscribed(count=2, timeout=5)
    await eventually(lambda: agent.connected_calls == 2, 2, "on_connected again")


async def test_frozen_controller_is_detected_and_left(start_agent) -> None:
    """A peer that stops answering (SIGSTOP: the kernel still ACKs, nothing replies)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.controller_double", "--port", "0",
        cwd=ROOT, stdout=asyncio.subprocess.PIPE)
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 15)).decode().split()
        assert line[0] == "READY", line
        agent, task = await start_agent(line[1])
        await eventually(lambda: agent.client.connected, 5, "subscription")
        await asyncio.sleep(1.6)  # longer than interval + timeout: pongs keep it up
        assert agent.client.connected and agent.connected_calls == 1
        os.kill(proc.pid, signal.SIGSTOP)
        took = await eventually(lambda: not agent.client.connected, 4, "dead peer detection")
        assert took <= FAST["ping_interval"] + FAST["ping_timeout"] + 0.5
        await asyncio.sleep(1.5)  # reconnect attempts hang in the handshake and time out
        assert not agent.client.connected and not task.done()
        os.kill(proc.pid, signal.SIGCONT)
        await eventually(lambda: agent.connected_calls == 2, 5, "reconnect after SIGCONT")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGCONT)
            proc.terminate()
        await proc.wait()


async def test_upgrade_that_never_answers_times_out_and_retries(start_agent) -> None:
    accepted: list[asyncio.StreamWriter] = []

    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)
        await reader.read(65536)  # the upgrade request; never answered

    server = await asyncio.start_server(swallow, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        agent, task = await start_agent(f"http://127.0.0.1:{port}/v1")
        await eventually(lambda: len(accepted) >= 3, 5, "three handshake attempts")
        assert not agent.client.connected and not task.done() and agent.connected_calls == 0
    finally:
        for writer in accepted:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_aclose_ends_run(double) -> None:
    client = ControllerClient(double.url, "agent", "secret", event_names=EVENTS, **FAST)
    agent = Agent(client)
    task = asyncio.create_task(client.run(agent.on_frame))
    await double.wait_subscribed()
    await client.aclose()
    await asyncio.wait_for(task, 3)
    assert not client.connected
    await eventually(lambda: double.connected == 0, 2, "server side close")
