"""Health checks end to end: `herdsman run` as a real process on qemu:///system (TCG), the
controller double sending Cattle's events and taking the serviceevents, the real test guest.

Two guests for the module, booted together (booting is the slow part): `web` runs busybox
httpd on port 80 under an HTTP check; `closed` has a TCP check on port 81, where nothing
listens. What a user checks: web turns healthy (UP) once httpd answers; killing httpd over exec
makes it unhealthy (DOWN) after unhealthyThreshold intervals, and starting it again healthy
after healthyThreshold intervals (both measured: the issue asks for a time within one
interval of the expected, here with a margin for a loaded 2-core machine); the closed port never
turns healthy and its initializingTimeout is reported and logged; the serviceevents have
exactly Rancher's shape and come with the health key; the state shows in a ping and in
`herdsman ls`.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import pytest_asyncio

from agent.streams.client import messages, open_stream
from tests.agent_harness import REPO, AgentProcess, instance_event, ping, ping_instances, vm_instance
from tests.console_exec_guest import decode
from tests.controller_double import ControllerDouble
from tests.libvirtd_fixtures import SYSTEM_URI, cleanup_test_host, new_test_root, system_connection
from tests.ports_fixtures import drop_table
from tests.test_e2e_guest import guest_manifest, wait_for

pytestmark = [pytest.mark.libvirtd, pytest.mark.guest, pytest.mark.timeout(900),
              pytest.mark.asyncio(loop_scope="module")]

INTERVAL = 2.0  # s: web's check
RISE, FALL = 2, 3
#: what a loaded machine may add to a measured time: the agent, qemu and two other engineers'
#: guests share 2 cores (the report itself is one local HTTP request)
MARGIN = 1.5
WEB_CHECK = {"port": 80, "requestLine": "GET / HTTP/1.0", "interval": int(INTERVAL * 1000), "responseTimeout": 1000,
             "healthyThreshold": RISE, "unhealthyThreshold": FALL, "initializingTimeout": 0}  # 0: never (a TCG boot)
CLOSED_TIMEOUT = 40.0  # s: closed's initializingTimeout
CLOSED_INTERVAL = 1.0
CLOSED_CHECK = {"port": 81, "interval": int(CLOSED_INTERVAL * 1000), "responseTimeout": 500, "healthyThreshold": 2,
                "unhealthyThreshold": 3, "initializingTimeout": int(CLOSED_TIMEOUT * 1000)}
USERDATA = """#!/bin/sh
mkdir -p /www && echo HEALTH-PAGE > /www/index.html && httpd -p 80 -h /www
echo HTTPD-STARTED
"""
HEALTH_KEY = ("delegate-key", "delegate-secret")  # as Cattle wants: not the host agent's own


@dataclass
class Host:
    ctl: ControllerDouble
    agent: AgentProcess
    host_uuid: str
    env: dict[str, str]
    dirs: dict[str, Any]
    web: dict[str, Any] = field(default_factory=dict)
    closed: dict[str, Any] = field(default_factory=dict)
    #: time.monotonic() when closed's activate was sent, and when its reply came (the agent
    #: starts watching in between)
    closed_activated: tuple[float, float] = (0.0, 0.0)


def reports(ctl: ControllerDouble, instance: dict[str, Any]) -> list[tuple[float, dict[str, Any]]]:
    """(arrival, body) of every report the controller accepted for this VM, in order."""
    return [(at, body) for at, status, body in ctl.service_event_attempts
            if status == 201 and f"_{instance['uuid']}_" in body.get("healthcheckUuid", "")]


async def next_report(ctl: ControllerDouble, instance: dict[str, Any], after: int, timeout: float) -> tuple[float, dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        found = reports(ctl, instance)
        if len(found) > after:
            return found[after]
        assert time.monotonic() < deadline, f"no report for {instance['name']} within {timeout} s: {found}"
        await asyncio.sleep(0.05)


async def guest_exec(host: Host, command: str) -> tuple[float, float]:
    """Run `command` in web through compute.instance.execute and the agent's stream server;
    (sent, done): time.monotonic() just before the stream opened and once the command ended."""
    for attempt in range(30):  # the guest agent may still be starting
        reply = await instance_event(host.ctl, "execute", host.web,
                                     process={"command": ["sh", "-c", command], "tty": False, "attachStdin": False})
        assert reply.get("transitioning") is None, reply.get("transitioningMessage")
        body = reply["data"]["instanceHostMap"]
        sent = time.monotonic()
        controls, output = [], bytearray()
        async with open_stream(body["url"], body["token"]) as ws:
            async for message in messages(ws):
                if isinstance(message, str) and message.startswith("{"):
                    controls.append(json.loads(message))
                else:
                    output += decode(message)
        done = time.monotonic()
        if any("exit" in c for c in controls):
            assert controls[-1] == {"exit": 0}, (controls, output)
            return sent, done
        await asyncio.sleep(1)
    raise AssertionError(f"exec never ran in the guest: {controls}")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def host() -> AsyncIterator[Host]:
    if os.geteuid() != 0:
        pytest.skip("needs root for qemu:///system (run scripts/test as root, as CI does)")
    conn = system_connection()
    token, root = new_test_root()
    dirs: dict[str, Any] = {"state_dir": root / "state", "log_dir": root / "log", "storage_pool": f"hmtest-{token}"}
    table = f"hmt_{token}"
    ctl = ControllerDouble()
    ctl.health_keys = HEALTH_KEY
    await ctl.start()
    host_uuid = str(uuid.uuid4())
    env = {"HERDSMAN_STORAGE_POOL": dirs["storage_pool"], "HERDSMAN_PORTS_TABLE": table,
           "HERDSMAN_STREAM_LISTEN": "127.0.0.1:0", "HERDSMAN_HOST_UUID": host_uuid,
           "HERDSMAN_HEALTH_ACCESS_KEY": HEALTH_KEY[0], "HERDSMAN_HEALTH_SECRET_KEY": HEALTH_KEY[1]}
    agent = AgentProcess(ctl.url, dirs["state_dir"], dirs["log_dir"], uri=SYSTEM_URI, env=env)
    try:
        image = guest_manifest(root / "images")
        agent.start()
        await ctl.wait_subscribed(timeout=60)
        found = Host(ctl, agent, host_uuid, env, dirs)
        found.web = vm_instance("web", memory_mb=160, imageUuid=image, userdata=USERDATA, hostname="web",
                                healthCheck=WEB_CHECK, startCount=1, restartPolicy={"name": "always"})
        found.closed = vm_instance("closed", memory_mb=160, imageUuid=image, hostname="closed",
                                   healthCheck=CLOSED_CHECK, startCount=5)

        async def activate(instance: dict[str, Any]) -> tuple[float, float]:
            sent = time.monotonic()
            reply = await instance_event(ctl, "activate", instance, timeout=300)
            assert reply.get("transitioning") is None, reply.get("transitioningMessage")
            assert reply["data"]["instanceHostMap"]["instance"]["+data"]["+fields"]["healthState"] == "initializing"
            return sent, time.monotonic()

        _, found.closed_activated = await asyncio.gather(activate(found.web), activate(found.closed))
        yield found
        for instance in (found.web, found.closed):
            await instance_event(ctl, "purge", instance, timeout=120)
    finally:
        agent.kill(signal.SIGKILL)
        await ctl.stop()
        cleanup_test_host(conn, root, dirs["storage_pool"])
        drop_table(table)
        conn.close()


def herdsman_ls(host: Host) -> dict[str, dict[str, str]]:
    """`herdsman ls` as a user runs it, next to the daemon: UUID → its columns (it lists every
    herdsman VM of this libvirtd, other tests' too)."""
    result = subprocess.run(
        [sys.executable, "-m", "agent", "ls", "--libvirt-uri", SYSTEM_URI, "--state-dir", str(host.dirs["state_dir"]),
         "--log-dir", str(host.dirs["log_dir"])],
        cwd=REPO, env={**os.environ, **host.env}, capture_output=True, text=True, timeout=120, check=True)
    lines = result.stdout.splitlines()
    header = lines[0].split()
    return {row[1]: dict(zip(header, row)) for row in (line.split() for line in lines[1:])}


async def test_httpd_turns_the_vm_healthy(host: Host) -> None:
    await wait_for(host.dirs["log_dir"] / "console" / f"{host.web['uuid']}.log", "HTTPD-STARTED", 300)
    _, first = await next_report(host.ctl, host.web, 0, timeout=120)
    assert first["reportedHealth"] == "UP"  # nothing before it: failures while booting are not held against it
    assert first["healthcheckUuid"] == f"{host.host_uuid}_{host.web['uuid']}_1"
    assert ping_instances(await ping(host.ctl))[host.web["uuid"]]["healthState"] == "healthy"


async def test_killing_httpd_makes_it_unhealthy_after_fall_intervals(host: Host) -> None:
    before = len(reports(host.ctl, host.web))
    sent, done = await guest_exec(host, "killall httpd")
    arrived, report = await next_report(host.ctl, host.web, before, timeout=FALL * INTERVAL + 30)
    assert report["reportedHealth"] == "DOWN"
    print(f"unhealthy {arrived - done:.2f} s after httpd was killed (expected {FALL * INTERVAL:.0f} s, "
          f"the exec took {done - sent:.2f} s)")
    # the first failed probe comes within one interval of the kill, the state turns after
    # FALL of them: between FALL-1 and FALL intervals (FALL × INTERVAL within one interval)
    assert arrived - sent >= (FALL - 1) * INTERVAL - 0.25
    assert arrived - done <= FALL * INTERVAL + MARGIN
    assert ping_instances(await ping(host.ctl))[host.web["uuid"]]["healthState"] == "unhealthy"


async def test_starting_httpd_again_makes_it_healthy_after_rise_intervals(host: Host) -> None:
    before = len(reports(host.ctl, host.web))
    sent, done = await guest_exec(host, "httpd -p 80 -h /www")
    arrived, report = await next_report(host.ctl, host.web, before, timeout=RISE * INTERVAL + 30)
    assert report["reportedHealth"] == "UP"
    print(f"healthy {arrived - done:.2f} s after httpd started (expected {RISE * INTERVAL:.0f} s)")
    assert arrived - sent >= (RISE - 1) * INTERVAL - 0.25
    assert arrived - done <= RISE * INTERVAL + MARGIN


async def test_a_closed_port_never_turns_healthy_and_the_initializing_timeout_is_reported(host: Host) -> None:
    arrived, report = await next_report(host.ctl, host.closed, 0, timeout=CLOSED_TIMEOUT + 60)
    assert report == {"healthcheckUuid": f"{host.host_uuid}_{host.closed['uuid']}_5", "reportedHealth": "DOWN",
                      "externalTimestamp": report["externalTimestamp"]}
    sent, replied = host.closed_activated
    print(f"closed port: unhealthy {arrived - replied:.2f} s after the activate reply "
          f"(initializingTimeout {CLOSED_TIMEOUT:.0f} s; the activate took {replied - sent:.2f} s)")
    assert arrived - sent >= CLOSED_TIMEOUT  # never before the timeout, counted from the start
    assert arrived - replied <= CLOSED_TIMEOUT + CLOSED_INTERVAL + MARGIN
    assert ping_instances(await ping(host.ctl))[host.closed["uuid"]]["healthState"] == "unhealthy"
    log = [line for line in host.agent.output().splitlines() if "health state changed" in line and host.closed["uuid"] in line]
    assert len(log) == 1 and "WARNING" in log[0] and "initializing timeout" in log[0], log
    await asyncio.sleep(3 * CLOSED_INTERVAL)
    assert [body["reportedHealth"] for _, body in reports(host.ctl, host.closed)] == ["DOWN"]  # never UP


async def test_service_events_have_exactly_the_documented_shape(host: Host) -> None:
    attempts = host.ctl.service_event_attempts
    assert attempts and all(status == 201 for _, status, _ in attempts)  # the health key, accepted at once
    assert host.ctl.auth_failures == []
    pattern = re.compile(rf"^{host.host_uuid}_[0-9a-f-]{{36}}_\d+$")
    last: dict[str, int] = {}
    for _, _, body in attempts:
        assert set(body) == {"healthcheckUuid", "reportedHealth", "externalTimestamp"}
        assert isinstance(body["healthcheckUuid"], str) and pattern.match(body["healthcheckUuid"])
        assert body["reportedHealth"] in ("UP", "DOWN")
        stamp = body["externalTimestamp"]
        assert isinstance(stamp, int) and not isinstance(stamp, bool)
        assert abs(stamp - time.time()) < 900  # Unix seconds, not milliseconds
        assert stamp >= last.get(body["healthcheckUuid"], 0)
        last[body["healthcheckUuid"]] = stamp
    assert [b["reportedHealth"] for _, b in reports(host.ctl, host.web)] == ["UP", "DOWN", "UP"]  # transitions only


async def test_ping_and_herdsman_ls_show_the_health_state(host: Host) -> None:
    records = ping_instances(await ping(host.ctl))
    assert records[host.web["uuid"]]["healthState"] == "healthy"
    assert records[host.closed["uuid"]]["healthState"] == "unhealthy"
    rows = await asyncio.to_thread(herdsman_ls, host)
    web, closed = rows[host.web["uuid"]], rows[host.closed["uuid"]]
    assert (web["NAME"], web["STATE"], web["HEALTH"]) == ("web", "running", "healthy")
    assert (closed["NAME"], closed["HEALTH"]) == ("closed", "unhealthy")


async def test_a_vm_the_restart_policy_starts_again_is_reinitializing_and_never_reported_down(host: Host) -> None:
    """qemu killed from outside: the policy starts web again; meanwhile it is neither probed nor
    reported, then `reinitializing` (it was healthy), then healthy once httpd is back."""
    uuid = host.web["uuid"]
    before = len(reports(host.ctl, host.web))
    conn = system_connection()
    try:
        conn.lookupByUUIDString(uuid).destroy()
    finally:
        conn.close()
    await host.ctl.wait_container_event(lambda e: e["externalId"] == uuid and e["externalStatus"] == "start", timeout=60)
    assert ping_instances(await ping(host.ctl))[uuid]["healthState"] == "reinitializing"
    _, report = await next_report(host.ctl, host.web, before, timeout=180)
    assert report == {"healthcheckUuid": f"{host.host_uuid}_{uuid}_1", "reportedHealth": "UP",
                      "externalTimestamp": report["externalTimestamp"]}
    assert ping_instances(await ping(host.ctl))[uuid]["healthState"] == "healthy"


async def test_a_killed_agent_adopts_the_checks_with_their_start_counts(host: Host) -> None:
    """SIGKILL, start again: the VMs are adopted (none restarted), probed again, and their
    reports keep the start counts the controller gave (the agent kept them in health.json)."""
    web_before, closed_before = len(reports(host.ctl, host.web)), len(reports(host.ctl, host.closed))
    conn = system_connection()
    ids = [conn.lookupByUUIDString(i["uuid"]).ID() for i in (host.web, host.closed)]
    host.agent.kill(signal.SIGKILL)
    host.agent.start()
    await host.ctl.wait_subscribed(timeout=60, count=2)
    # adopted VMs start from initializing: passes make web healthy, failures closed unhealthy
    _, web = await next_report(host.ctl, host.web, web_before, timeout=60)
    assert web == {"healthcheckUuid": f"{host.host_uuid}_{host.web['uuid']}_1", "reportedHealth": "UP",
                   "externalTimestamp": web["externalTimestamp"]}
    _, closed = await next_report(host.ctl, host.closed, closed_before, timeout=60)
    assert closed == {"healthcheckUuid": f"{host.host_uuid}_{host.closed['uuid']}_5", "reportedHealth": "DOWN",
                      "externalTimestamp": closed["externalTimestamp"]}
    records = ping_instances(await ping(host.ctl))
    assert (records[host.web["uuid"]]["healthState"], records[host.closed["uuid"]]["healthState"]) == ("healthy", "unhealthy")
    assert "adopted managed domains" in host.agent.output()
    assert [conn.lookupByUUIDString(i["uuid"]).ID() for i in (host.web, host.closed)] == ids  # the same qemus
    conn.close()
