"""Health checks under qemu:///session (the debug mode's user-mode networking): the guest has no
address the host can reach, so the agent probes the port qemu forwards to the check's port.

The real test guest runs busybox httpd on port 80, published as 127.0.0.1:<free port>; its
HTTP check on port 80 turns it healthy, reported UP, in the ping.
"""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path
from typing import Any

import libvirt
import pytest

from tests.agent_harness import instance_event, ping, ping_instances, running_agent, vm_instance
from tests.libvirtd_fixtures import host_dirs, remove_pool, system_conn  # noqa: F401 (fixtures)
from tests.test_e2e_guest import guest_manifest, wait_for

pytestmark = [pytest.mark.libvirtd, pytest.mark.guest, pytest.mark.timeout(600)]

USERDATA = "#!/bin/sh\nmkdir -p /www && echo OK > /www/index.html && httpd -p 80 -h /www\necho HTTPD-STARTED\n"


async def test_session_mode_probes_the_forwarded_port(tmp_path: Path, host_dirs: dict[str, Any]) -> None:  # noqa: F811
    try:
        libvirt.open("qemu:///session").close()
    except libvirt.libvirtError as exc:
        pytest.skip(f"qemu:///session unavailable: {exc}")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    image = guest_manifest(tmp_path / "images")
    check = {"port": 80, "requestLine": "GET / HTTP/1.0", "interval": 1000, "healthyThreshold": 2,
             "unhealthyThreshold": 3, "initializingTimeout": 0}
    dirs = dict(host_dirs)
    async with running_agent(tmp_path, uri="qemu:///session", **dirs) as (ctl, agent):
        inst = vm_instance("session-health", memory_mb=160, imageUuid=image, userdata=USERDATA,
                           ports=[f"{port}:80"], healthCheck=check, startCount=1)
        reply = await instance_event(ctl, "activate", inst, timeout=300)
        assert reply.get("transitioning") is None, reply.get("transitioningMessage")
        assert agent.health.addresses(inst["uuid"], 80) == ("127.0.0.1", port)  # not a guest address
        try:
            await wait_for(Path(dirs["log_dir"]) / "console" / f"{inst['uuid']}.log", "HTTPD-STARTED", 300)
            deadline = time.monotonic() + 60
            while not ctl.service_events:
                assert time.monotonic() < deadline, "never reported healthy through the forwarded port"
                await asyncio.sleep(0.1)
            assert ctl.service_events[0]["healthcheckUuid"] == f"{agent.host_uuid}_{inst['uuid']}_1"
            assert ctl.service_events[0]["reportedHealth"] == "UP"
            assert ping_instances(await ping(ctl))[inst["uuid"]]["healthState"] == "healthy"
        finally:
            await instance_event(ctl, "purge", inst, timeout=120)
            session = libvirt.open("qemu:///session")
            try:
                remove_pool(session, dirs["storage_pool"])
            finally:
                session.close()
