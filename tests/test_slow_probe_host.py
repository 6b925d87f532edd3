"""A host whose /dev/kvm is root-only (no udev rule applied): libvirt then drops its qemu
capabilities cache on every lookup and probes qemu again, ~4 s each; defining one VM took
18 of them (80 s per VM). The agent gives the node the group and mode udev gives it before its
own first lookup, and says so, so neither its start-up nor an activate makes libvirt re-probe.

Runs on host B of the two-host environment (tests/hosts): its /dev/kvm is a node of its own,
so making it root-only slows nothing else on the machine. Re-probes are counted in host B's
libvirtd log ("Saved caps": one per probe), not timed.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.agent_harness import REPO, instance_event, vm_instance
from tests.controller_double import ControllerDouble
from tests.guest.build import ensure_guest, write_image_manifest
from tests.hosts.env import HostsEnv
from tests.hosts.fixture import hosts_env  # noqa: F401 (fixture)
from tests.hosts.host import Host

pytestmark = [pytest.mark.libvirtd, pytest.mark.guest, pytest.mark.timeout(600)]

CAPS_LOG = "/var/log/libvirt/caps-probes.log"


@pytest.fixture
def slow_probe_host(hosts_env: HostsEnv) -> Iterator[Host]:  # noqa: F811
    """Host B with /dev/kvm root:root 0600 and its libvirtd logging every capabilities probe."""
    b = hosts_env.b
    admin = ["virt-admin", "-c", "libvirtd:///system"]
    outputs = b.run([*admin, "daemon-log-outputs"], capture_output=True, text=True).stdout.split(":", 1)[1].strip()
    b.run([*admin, "daemon-log-filters", "1:qemu.qemu_capabilities 4:*"])
    b.run([*admin, "daemon-log-outputs", f"1:file:{CAPS_LOG}"])
    time.sleep(1.1)  # libvirt notices a change of /dev/kvm by its ctime, in whole seconds
    b.run(["chown", "root:root", "/dev/kvm"])
    b.run(["chmod", "0600", "/dev/kvm"])
    try:
        before = probes(b)
        b.run(["virsh", "-c", "qemu:///system", "domcapabilities"])
        assert probes(b) > before, "host B did not become a slow-probe host"
        yield b
    finally:
        b.run(["chown", "root:kvm", "/dev/kvm"])
        b.run(["chmod", "0660", "/dev/kvm"])
        b.run([*admin, "daemon-log-filters", ""])
        b.run([*admin, "daemon-log-outputs", outputs])


def probes(host: Host) -> int:
    try:
        return host.path(CAPS_LOG).read_text().count("Saved caps")
    except FileNotFoundError:
        return 0


async def test_the_agent_makes_kvm_usable_before_libvirt_probes_for_every_vm(
        hosts_env: HostsEnv, slow_probe_host: Host) -> None:  # noqa: F811
    b = slow_probe_host
    write_image_manifest(ensure_guest(), b.path("/var/lib/herdsman") / "slow-probe-image.json")
    ctl = ControllerDouble()
    await ctl.start(host=hosts_env.root_address)
    log_path = b.path("/var/log/herdsman") / "slow-probe-agent.log"
    log = open(log_path, "wb")
    before = probes(b)
    agent = b.popen([sys.executable, "-m", "agent", "run", "--url", ctl.url, "--access-key", "agent",
                     "--secret-key", "secret", "--domain-type", "qemu", "--log-format", "text"],
                    cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    inst = vm_instance("slow-probe", memory_mb=128, networkMode="none",
                       imageUuid="kernel:file:///var/lib/herdsman/slow-probe-image.json")
    try:
        await ctl.wait_subscribed(timeout=120)
        text = log_path.read_text()
        assert "/dev/kvm was 0600" in text and "made it group kvm 0660" in text, text[-2000:]
        mode = b.run(["stat", "-c", "%G %a", "/dev/kvm"], capture_output=True, text=True).stdout.split()
        assert mode == ["kvm", "660"]
        assert probes(b) == before, "the agent's start-up made libvirt probe qemu"
        reply = await instance_event(ctl, "activate", inst, timeout=300)
        assert reply.get("transitioning") != "error", reply
        assert reply["data"]["instanceHostMap"]["instance"]["+data"]["+fields"]["herdsmanState"] == "running"
        assert probes(b) == before, "defining and starting the VM made libvirt probe qemu"
    finally:
        await instance_event(ctl, "purge", inst, timeout=120)
        agent.kill()
        agent.wait(timeout=30)
        log.close()
        await ctl.stop()
        await asyncio.sleep(0)
        Path(b.path("/var/lib/herdsman") / "slow-probe-image.json").unlink(missing_ok=True)
