"""A real test guest on the `default` network, booted through the real agent, for the logs and
proxy stream tests (one boot per test module: booting is the slow part).

Like tests/test_e2e_guest.py (controller double → compute.instance.activate → libvirtd + qemu
TCG), with the agent's stream server on 127.0.0.1:0. Everything created is removed afterwards.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import libvirt
import pytest

from agent.app import Agent
from tests.agent_harness import instance_event, running_agent, vm_instance
from tests.controller_double import ControllerDouble
from tests.libvirtd_fixtures import (
    SYSTEM_URI,
    cleanup_test_host,
    new_test_root,
    system_connection,
)
from tests.test_e2e_guest import guest_manifest, wait_for


@dataclass
class NetGuest:
    ctl: ControllerDouble
    agent: Agent
    instance: dict[str, Any]
    dirs: dict[str, Any]

    @property
    def uuid(self) -> str:
        return str(self.instance["uuid"])

    @property
    def log(self) -> Path:
        return Path(self.dirs["log_dir"]) / "console" / f"{self.uuid}.log"

    @property
    def stream_base(self) -> str:
        return f"ws://127.0.0.1:{self.agent.streams.port}"


@contextlib.asynccontextmanager
async def net_guest(name: str, userdata: str, *, ready_marker: str, **settings: Any) -> AsyncIterator[NetGuest]:
    """`settings` are more agent settings (AgentConfig fields), e.g. metrics_listen."""
    if os.geteuid() != 0:
        pytest.skip("needs root for qemu:///system (run scripts/test as root, as CI does)")
    token, root = new_test_root()
    pool = f"hmtest-{token}"
    dirs: dict[str, Any] = {"state_dir": root / "state", "log_dir": root / "log", "storage_pool": pool}
    try:
        image = guest_manifest(root / "images")
        async with running_agent(root, uri=SYSTEM_URI, stream_listen="127.0.0.1:0", **dirs, **settings) as (ctl, agent):
            # opened once the agent has bound libvirt's event loop to this test loop
            system_connection().close()  # skips when libvirtd is away
            inst = vm_instance(name, memory_mb=160, imageUuid=image, userdata=userdata, hostname=name)
            reply = await instance_event(ctl, "activate", inst, timeout=300)
            assert reply.get("transitioning") is None, reply.get("transitioningMessage")
            guest = NetGuest(ctl, agent, inst, dirs)
            try:
                await wait_for(guest.log, ready_marker, 300)
                yield guest
            finally:
                await instance_event(ctl, "purge", inst, timeout=120)
    finally:
        with contextlib.suppress(libvirt.libvirtError):
            conn = libvirt.open(SYSTEM_URI)
            cleanup_test_host(conn, root, pool)
            conn.close()
        shutil.rmtree(root, ignore_errors=True)
