"""The daemon against the real libvirtd + qemu (TCG): lifecycle, host-side events, SIGKILL recovery."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time

import libvirt
import pytest

from tests.agent_harness import AgentProcess, instance_event, ping, ping_instances, running_agent, vm_instance
from tests.controller_double import ControllerDouble
from tests.libvirtd_fixtures import SYSTEM_URI, host_dirs, system_conn  # noqa: F401 (fixtures)

pytestmark = [pytest.mark.libvirtd, pytest.mark.timeout(600)]


async def test_lifecycle_on_real_qemu(tmp_path, system_conn, host_dirs):
    async with running_agent(tmp_path, uri=SYSTEM_URI, **host_dirs) as (ctl, agent):
        # No image: SeaBIOS finds nothing to boot and idles, and ignores the ACPI power button.
        inst = vm_instance("acpi-deaf", memory_mb=32)
        uuid = inst["uuid"]
        reply = await instance_event(ctl, "activate", inst)
        assert reply.get("transitioning") is None, reply.get("transitioningMessage")
        dom = system_conn.lookupByUUIDString(uuid)
        assert dom.isActive()
        assert dom.XMLDesc(0).count("type='qemu'") >= 1 or "type=\"qemu\"" in dom.XMLDesc(0)
        seed = host_dirs["state_dir"] / "seeds" / f"{uuid}.iso"
        assert seed.exists()

        started = time.monotonic()
        reply = await instance_event(ctl, "deactivate", inst, process={"timeout": 2})
        elapsed = time.monotonic() - started
        assert reply["data"]["instanceHostMap"]["instance"]["+data"]["+fields"]["herdsmanState"] == "stopped"
        assert not dom.isActive()
        assert 2.0 <= elapsed < 20, f"the guest ignores ACPI: destroyed after the 2 s timeout, took {elapsed:.1f}s"

        await instance_event(ctl, "activate", inst)
        assert dom.isActive()
        os.system(f"virsh -c {SYSTEM_URI} destroy {uuid} >/dev/null")  # from outside, as an operator would
        event = await ctl.wait_container_event(
            lambda e: e["externalId"] == uuid and e["externalStatus"] == "die", timeout=2)
        assert event["reportedHostUuid"] == agent.host_uuid
        assert ping_instances(await ping(ctl))[uuid]["state"] == "stopped"

        reply = await instance_event(ctl, "remove", inst, process={"timeout": 0})
        assert reply["data"] == {"instanceHostMap": {}}
        with pytest.raises(libvirt.libvirtError):
            system_conn.lookupByUUIDString(uuid)
        await instance_event(ctl, "purge", inst)
        assert not seed.exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_sigkill_with_20_running_vms_adopts_all_untouched(system_conn, host_dirs):
    ctl = ControllerDouble()
    await ctl.start()
    state, log = host_dirs["state_dir"], host_dirs["log_dir"]
    agent = AgentProcess(ctl.url, state, log, uri=SYSTEM_URI,
                         env={"HERDSMAN_STORAGE_POOL": host_dirs["storage_pool"]})
    instances = [vm_instance(f"k{i}", memory_mb=24) for i in range(20)]
    try:
        agent.start()
        await ctl.wait_subscribed(timeout=60)
        replies = await asyncio.gather(*(instance_event(ctl, "activate", inst, timeout=300) for inst in instances))
        assert all(r.get("transitioning") is None for r in replies), [r.get("transitioningMessage") for r in replies]
        ids_before = {i["uuid"]: system_conn.lookupByUUIDString(i["uuid"]).ID() for i in instances}
        assert all(v > 0 for v in ids_before.values())

        agent.kill(signal.SIGKILL)
        await asyncio.sleep(1)
        agent.start()
        await ctl.wait_subscribed(timeout=60, count=2)
        listed = ping_instances(await ping(ctl))
        assert {i["uuid"] for i in instances} <= set(listed)
        assert all(listed[i["uuid"]]["state"] == "running" for i in instances)
        ids_after = {i["uuid"]: system_conn.lookupByUUIDString(i["uuid"]).ID() for i in instances}
        assert ids_after == ids_before, "no VM was restarted"
        assert "adopted managed domains" in agent.output()
    finally:
        agent.kill(signal.SIGTERM)
        await ctl.stop()


async def test_systemd_notify_ready_after_subscription(tmp_path, system_conn, host_dirs):
    sock_path = tmp_path / "notify.sock"
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(str(sock_path))
    receiver.setblocking(False)
    ctl = ControllerDouble()
    agent = AgentProcess("http://127.0.0.1:%d/v1" % _free_port(), host_dirs["state_dir"], host_dirs["log_dir"], uri=SYSTEM_URI,
                         env={"NOTIFY_SOCKET": str(sock_path), "WATCHDOG_USEC": "1000000",
                              "HERDSMAN_STORAGE_POOL": host_dirs["storage_pool"]})
    messages: list[str] = []

    async def collect(seconds: float, until: str | None = None) -> None:
        """Read notifications for `seconds`, or until one carrying `until` arrived."""
        end = time.monotonic() + seconds
        while time.monotonic() < end and not (until and any(until in m for m in messages)):
            try:
                messages.append(receiver.recv(4096).decode())
            except BlockingIOError:
                await asyncio.sleep(0.05)

    try:
        # The controller is not there yet: no READY, but the watchdog is fed from the loop.
        agent.start()
        await collect(4)
        assert not any("READY=1" in m for m in messages), messages
        assert sum("WATCHDOG=1" in m for m in messages) >= 3
        port = int(agent.args[agent.args.index("--url") + 1].split(":")[2].split("/")[0])
        await ctl.start(port=port)
        await ctl.wait_subscribed(timeout=60)
        await collect(15, until="READY=1")  # right after the subscription; a loaded machine may take seconds
        assert any("READY=1" in m for m in messages), messages
        agent.kill(signal.SIGTERM)
        await collect(5, until="STOPPING=1")
        assert any("STOPPING=1" in m for m in messages)
    finally:
        agent.kill(signal.SIGKILL)
        receiver.close()
        await ctl.stop()
