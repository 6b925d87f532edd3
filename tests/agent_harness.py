"""Run the real agent (in-process or as a process) against the controller double."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any, AsyncIterator

from agent.app import Agent
from agent.config import AgentConfig
from tests.controller_double import ControllerDouble
from tests.ports_fixtures import drop_table

REPO = Path(__file__).resolve().parent.parent


def vm_instance(name: str = "vm", *, uuid_: str | None = None, memory_mb: int = 32, **fields: Any) -> dict[str, Any]:
    """A Cattle instance as it sits in an event: columns plus data.fields."""
    return {
        "id": 7,
        "uuid": uuid_ or str(uuid.uuid4()),
        "name": name,
        "kind": "virtualMachine",
        "state": "starting",
        "memoryMb": memory_mb,
        "data": {"fields": {"vcpu": 1, **fields}},
    }


def host_map(instance: dict[str, Any], **process_data: Any) -> dict[str, Any]:
    data: dict[str, Any] = {"instanceHostMap": {"id": 3, "instance": instance, "host": {"id": 1, "kind": "libvirt"}}}
    if process_data:
        data["processData"] = process_data
    return data


async def instance_event(ctl: ControllerDouble, name: str, instance: dict[str, Any], *, timeout: float = 60,
                         resource_id: str | None = None, process: dict[str, Any] | None = None) -> dict[str, Any]:
    return await ctl.request(f"compute.instance.{name}", host_map(instance, **(process or {})),
                             resource_type="instanceHostMap", resource_id=resource_id or f"ihm-{str(instance.get('uuid'))[:8]}",
                             timeout=timeout)


async def ping(ctl: ControllerDouble, *, instances: bool = True) -> dict[str, Any]:
    return await ctl.request("ping", {"options": {"instances": instances}, "resources": []},
                             resource_type="agent", resource_id="2")


def ping_instances(reply: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["uuid"]: r for r in reply["data"]["resources"] if r["type"] == "instance"}


@contextlib.asynccontextmanager
async def running_agent(tmp_path: Path, *, uri: str = "test:///default", **overrides: Any) -> AsyncIterator[tuple[ControllerDouble, Agent]]:
    ctl = ControllerDouble()
    await ctl.start()
    settings: dict[str, Any] = {"state_dir": tmp_path / "state", "log_dir": tmp_path / "log", **overrides}
    if uri == "qemu:///system":  # published ports in a table of this test's own, removed afterwards
        settings.setdefault("ports_table", f"hmt_{uuid.uuid4().hex[:8]}")
    config = AgentConfig(url=ctl.url, access_key="agent", secret_key="secret", libvirt_uri=uri,
                         domain_type="qemu", **settings)
    agent = Agent(config)
    task = asyncio.create_task(agent.run())
    try:
        await ctl.wait_subscribed(timeout=30)
        yield ctl, agent
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        await agent.client.aclose()
        await agent.driver.close()
        await ctl.stop()
        if uri == "qemu:///system":
            await asyncio.to_thread(drop_table, config.ports_table)


class AgentProcess:
    """`herdsman run` as a real process, for tests that kill it."""

    def __init__(self, url: str, state_dir: Path, log_dir: Path, *, uri: str, env: dict[str, str] | None = None,
                 extra: list[str] | None = None, umask: int | None = None) -> None:
        """`extra`: more `herdsman run` arguments; `umask`: the process's umask (a hardened host's 077)."""
        self.args = [sys.executable, "-m", "agent", "run", "--url", url, "--access-key", "agent", "--secret-key", "secret",
                     "--libvirt-uri", uri, "--state-dir", str(state_dir), "--log-dir", str(log_dir),
                     "--domain-type", "qemu", "--log-format", "text", *(extra or [])]
        self.env = {**os.environ, **(env or {})}
        self.umask = umask
        self.log_path = state_dir.parent / "agent.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        umask = self.umask
        self.proc = subprocess.Popen(self.args, cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                     preexec_fn=None if umask is None else (lambda: os.umask(umask)))
        log.close()

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=30)

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
