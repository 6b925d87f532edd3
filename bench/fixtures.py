"""What the benchmarks share: the VMs they create, the agent they run, and the clean-up.

Every VM is the same realistic shape (two disks, cloud-init userdata, labels, one NIC with a
controller-allocated MAC) so that the activate, render and scale figures describe one
workload. Disks are small because libvirt's test driver charges each volume's full capacity
against a 100 GiB pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterable, Iterator
from pathlib import Path
from typing import Any, TextIO

import libvirt

from agent.app import Agent, build_driver
from agent.config import AgentConfig
from agent.logs import configure_logging
from agent.spec.cattle import spec_from_cattle_instance
from drivers.libvirt.capabilities import probe_host_profile
from drivers.libvirt.domxml.builder import render_xml
from drivers.libvirt.domxml.inputs import HostPolicy, RenderInput
from drivers.libvirt.host_profile import HostProfile

TEST_URI = "test:///default"
POOL = "herdsman"
USERDATA = (
    "#cloud-config\n"
    "package_update: true\n"
    "packages: [nginx, curl]\n"
    "write_files:\n"
    "  - path: /etc/motd\n"
    "    content: 'managed by herdsman'\n"
    "runcmd:\n"
    "  - [systemctl, enable, --now, nginx]\n"
)

# libvirt reports errors as exceptions; without a handler it also prints each one to stderr.
libvirt.registerErrorHandler(lambda _ctx, _err: None, None)


def instance(index: int, tag: str) -> dict[str, Any]:
    """A Cattle virtualMachine instance as it sits in an activate event."""
    mac = uuid.uuid4().bytes[:3]
    return {
        "id": 1000 + index,
        "uuid": str(uuid.uuid4()),
        "name": f"bench-{tag}-{index}",
        "kind": "virtualMachine",
        "state": "starting",
        "memoryMb": 64,
        "userdata": USERDATA,
        "nics": [{"id": 1, "deviceNumber": 0, "macAddress": "52:54:00:" + mac.hex(":")}],
        "data": {"fields": {
            "vcpu": 1,
            "labels": {"io.herdsman.bench": tag, "tier": "web", "index": str(index)},
            "disks": [{"name": "data", "size": "8m"}, {"name": "logs", "size": "8m"}],
        }},
    }


def instances(count: int, tag: str) -> list[dict[str, Any]]:
    return [instance(i, tag) for i in range(count)]


def activate_request(inst: dict[str, Any]) -> dict[str, Any]:
    """The request the controller process sends: Cattle's compute.instance.activate."""
    return {
        "name": "compute.instance.activate",
        "data": {"instanceHostMap": {"id": inst["id"], "instance": inst, "host": {"id": 1, "kind": "libvirt"}}},
        "resourceType": "instanceHostMap",
        "resourceId": f"ihm-{inst['id']}",
        "context": {"topProcessName": "instance.create"},
        "timeoutMillis": 120_000,
    }


def ping_request(with_instances: bool = True) -> dict[str, Any]:
    return {"name": "ping", "data": {"options": {"instances": with_instances}, "resources": []},
            "resourceType": "agent", "resourceId": "2"}


def agent_config(url: str, root: Path, uri: str = TEST_URI) -> AgentConfig:
    return AgentConfig(url=url, access_key="agent", secret_key="secret", libvirt_uri=uri,
                       state_dir=root / "state", log_dir=root / "log", domain_type="qemu", log_format="json")


def profile_of(conn: libvirt.virConnect) -> HostProfile:
    """The host profile the agent probes for itself on the same connection."""
    return probe_host_profile(conn, "qemu")


def policy_of(config: AgentConfig) -> HostPolicy:
    """The agent's own policy (layout, network, VNC secret from the state dir)."""
    return build_driver(config).policy


def render(inst: dict[str, Any], profile: HostProfile, policy: HostPolicy) -> str:
    """The domain XML the agent defines for this instance (same spec, profile and policy)."""
    mac = inst["nics"][0]["macAddress"]
    return render_xml(RenderInput(spec=spec_from_cattle_instance(inst), profile=profile, policy=policy, macs=(mac,)))


@contextlib.contextmanager
def scratch(prefix: str) -> Iterator[Path]:
    """A temp dir on the same disk as the agent's state would be (seeds are fsync'ed there)."""
    with tempfile.TemporaryDirectory(prefix=f"herdsman-bench-{prefix}-") as tmp:
        yield Path(tmp)


def _append(path: Path) -> TextIO:
    return path.open("a", encoding="utf-8")


@contextlib.asynccontextmanager
async def in_process_agent(config: AgentConfig, log_path: Path) -> AsyncIterator[Agent]:
    """`herdsman run` in this process, logging JSON lines to a file as the daemon would."""
    log_stream = _append(log_path)
    handler = configure_logging("json", "INFO", stream=log_stream)
    agent = Agent(config)
    task = asyncio.create_task(agent.run(), name="agent")
    try:
        yield agent
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        await agent.client.aclose()
        await agent.driver.close()
        for signum in (signal.SIGTERM, signal.SIGINT):  # Agent.run took them over for this loop
            asyncio.get_running_loop().remove_signal_handler(signum)
        logging.getLogger().removeHandler(handler)
        handler.close()
        log_stream.close()


def purge(conn: libvirt.virConnect, uuids: Iterable[str]) -> None:
    """Destroy and undefine these domains and delete their volumes (test driver state)."""
    wanted = set(uuids)
    for dom in conn.listAllDomains(0):
        if dom.UUIDString() in wanted:
            if dom.isActive():
                dom.destroy()
            dom.undefine()
    with contextlib.suppress(libvirt.libvirtError):
        pool = conn.storagePoolLookupByName(POOL)
        for vol in pool.listAllVolumes(0):
            if vol.name()[:36] in wanted:
                vol.delete(0)
