"""Boot the real test guest under libvirt + qemu (TCG) and check what an agent relies on:
serial console markers, NoCloud seed, virtio disks with serials, user-data, the guest
agent, DHCP on the `default` network, an interactive console shell, ACPI and agent
shutdown, and that a second boot keeps the root disk.
"""

from __future__ import annotations

import base64
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import libvirt
import libvirt_qemu
import pytest

from .build import GuestImage, ensure_guest

pytestmark = [pytest.mark.guest, pytest.mark.timeout(300)]

REPO = Path(__file__).resolve().parents[2]
READY_TIMEOUT = 120.0  # TCG on a busy 2-core machine; an idle one needs ~8 s
POWER_OFF_TIMEOUT = 30.0


@dataclass
class Host:
    conn: libvirt.virConnect
    system: bool  # qemu:///system (root, `default` network) or qemu:///session


@dataclass
class Workdir:
    path: Path
    token: str
    seed: Path
    root_disk: Path
    data_disk: Path
    serial_log: Path


@pytest.fixture(scope="module")
def host() -> Iterator[Host]:
    if os.geteuid() == 0:
        subprocess.run([str(REPO / "scripts" / "libvirt-up")], check=True, timeout=60)
        uri, system = "qemu:///system", True
    else:
        uri, system = "qemu:///session", False
    try:
        conn = libvirt.open(uri)
    except libvirt.libvirtError as exc:
        if system:
            raise
        pytest.skip(f"not root and qemu:///session is unavailable: {exc}")
    yield Host(conn, system)
    conn.close()


@pytest.fixture(scope="module")
def guest() -> GuestImage:
    started = time.monotonic()
    image = ensure_guest()
    _report(f"guest image ready in {time.monotonic() - started:.1f} s: {image.dir}")
    return image


@pytest.fixture
def workdir(host: Host) -> Iterator[Workdir]:
    token = secrets.token_hex(4)
    if host.system:
        base = Path("/var/lib/libvirt/images")
        base.mkdir(parents=True, exist_ok=True)
        path = base / f"herdsman-test-{token}"
        path.mkdir(mode=0o755)
    else:
        path = Path(tempfile.mkdtemp(prefix=f"herdsman-test-{token}-"))
    path.chmod(0o755)  # qemu runs as libvirt-qemu under qemu:///system
    try:
        seed = _make_seed(path, token)
        root_disk, data_disk = path / "root.qcow2", path / "data.qcow2"
        for disk, size in ((root_disk, "64M"), (data_disk, "16M")):
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), size],
                           check=True)
            disk.chmod(0o644)
        yield Workdir(path, token, seed, root_disk, data_disk, path / "serial.log")
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _make_seed(path: Path, token: str) -> Path:
    src = path / "seed"
    src.mkdir()
    (src / "meta-data").write_text(
        f"instance-id: iid-{token}\nlocal-hostname: guest-{token}\n"
    )
    (src / "user-data").write_text(
        "#!/bin/sh\n"
        f"echo USERDATA-{token}-$(hostname)\n"
        "if [ -f /mnt/root/herdsman-test ]; then\n"
        "    echo \"PREVIOUS-$(cat /mnt/root/herdsman-test)\"\n"
        "fi\n"
        f"echo written-{token} >/mnt/root/herdsman-test\n"
        "sync\n"
        "exit 3\n"
    )
    seed = path / "seed.iso"
    subprocess.run(
        ["genisoimage", "-quiet", "-o", str(seed), "-V", "cidata", "-J", "-r",
         str(src / "user-data"), str(src / "meta-data")],
        check=True,
    )
    seed.chmod(0o644)
    return seed


def domain_xml(name: str, image: GuestImage, work: Workdir, system: bool) -> str:
    """Hand-written domain: TCG, machine pc, direct kernel boot, seed on IDE cdrom."""
    dom = ET.Element("domain", type="qemu")
    ET.SubElement(dom, "name").text = name
    ET.SubElement(dom, "memory", unit="MiB").text = "128"
    ET.SubElement(dom, "vcpu").text = "1"
    os_el = ET.SubElement(dom, "os")
    ET.SubElement(os_el, "type", arch="x86_64", machine="pc").text = "hvm"
    ET.SubElement(os_el, "kernel").text = str(image.kernel)
    ET.SubElement(os_el, "initrd").text = str(image.initrd)
    ET.SubElement(os_el, "cmdline").text = image.cmdline
    features = ET.SubElement(dom, "features")
    ET.SubElement(features, "acpi")
    ET.SubElement(features, "apic")
    ET.SubElement(dom, "on_poweroff").text = "destroy"
    ET.SubElement(dom, "on_reboot").text = "restart"
    ET.SubElement(dom, "on_crash").text = "destroy"
    devices = ET.SubElement(dom, "devices")
    for disk, dev, disk_serial in (
        (work.root_disk, "vda", "root"),
        (work.data_disk, "vdb", "data"),
    ):
        el = ET.SubElement(devices, "disk", type="file", device="disk")
        ET.SubElement(el, "driver", name="qemu", type="qcow2")
        ET.SubElement(el, "source", file=str(disk))
        ET.SubElement(el, "target", dev=dev, bus="virtio")
        ET.SubElement(el, "serial").text = disk_serial
    cdrom = ET.SubElement(devices, "disk", type="file", device="cdrom")
    ET.SubElement(cdrom, "driver", name="qemu", type="raw")
    ET.SubElement(cdrom, "source", file=str(work.seed))
    ET.SubElement(cdrom, "target", dev="hdc", bus="ide")
    ET.SubElement(cdrom, "readonly")
    if system:
        nic = ET.SubElement(devices, "interface", type="network")
        ET.SubElement(nic, "source", network="default")
    else:
        nic = ET.SubElement(devices, "interface", type="user")
    ET.SubElement(nic, "model", type="virtio")
    serial = ET.SubElement(devices, "serial", type="pty")
    ET.SubElement(serial, "log", file=str(work.serial_log), append="on")
    ET.SubElement(serial, "target", port="0")
    console = ET.SubElement(devices, "console", type="pty")
    ET.SubElement(console, "target", type="serial", port="0")
    channel = ET.SubElement(devices, "channel", type="unix")
    ET.SubElement(channel, "target", type="virtio", name="org.qemu.guest_agent.0")
    rng = ET.SubElement(devices, "rng", model="virtio")
    ET.SubElement(rng, "backend", model="random").text = "/dev/urandom"
    ET.SubElement(devices, "memballoon", model="none")
    return ET.tostring(dom, encoding="unicode")


class SerialLog:
    """Follows the serial log that virtlogd writes, from a given offset on."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.start = path.stat().st_size if path.exists() else 0

    def text(self) -> str:
        try:
            with self.path.open("rb") as f:
                f.seek(self.start)
                return f.read().decode("utf-8", "replace").replace("\r", "")
        except FileNotFoundError:
            return ""

    def wait_for(self, pattern: str, timeout: float) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while True:
            match = re.search(pattern, self.text(), re.MULTILINE)
            if match:
                return match
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"no {pattern!r} on the serial console within {timeout:.0f} s; "
                    f"log so far:\n{self.text()[-4000:]}"
                )
            time.sleep(0.1)


def agent(dom: libvirt.virDomain, command: str, **arguments: object) -> Any:
    request = {"execute": command, **({"arguments": arguments} if arguments else {})}
    reply = libvirt_qemu.qemuAgentCommand(dom, json.dumps(request), 10, 0)
    return json.loads(reply)["return"]


def agent_exec(dom: libvirt.virDomain, path: str, *args: str) -> tuple[int, str]:
    pid = agent(dom, "guest-exec", path=path, arg=list(args), **{"capture-output": True})["pid"]
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        status = agent(dom, "guest-exec-status", pid=pid)
        if status["exited"]:
            out = base64.b64decode(status.get("out-data", "")).decode()
            return status["exitcode"], out
        time.sleep(0.2)
    raise AssertionError(f"guest-exec {path} did not finish")


def wait_agent(dom: libvirt.virDomain, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            assert agent(dom, "guest-ping") == {}
            return
        except libvirt.libvirtError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)


def running(conn: libvirt.virConnect, name: str) -> bool:
    """Listing (not looking up) avoids libvirt's error printout for a vanished domain."""
    flags = libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE
    return any(dom.name() == name for dom in conn.listAllDomains(flags))


def wait_powered_off(conn: libvirt.virConnect, name: str, timeout: float) -> float:
    started = time.monotonic()
    while running(conn, name):  # a transient domain is gone once it powers off
        if time.monotonic() - started > timeout:
            raise AssertionError(f"{name} still running {timeout:.0f} s after shutdown request")
        time.sleep(0.2)
    return time.monotonic() - started


def run_on_console(
    conn: libvirt.virConnect, dom: libvirt.virDomain, log: SerialLog, line: str, expect: str
) -> None:
    """Type `line` on the serial console and wait for `expect` in the log.

    The stream stays open until the answer is seen: closing it right after send() may
    drop bytes libvirtd has not yet written to the pty.
    """
    stream = conn.newStream(0)
    dom.openConsole(None, stream, libvirt.VIR_DOMAIN_CONSOLE_FORCE)
    try:
        stream.send(line.encode() + b"\r")
        log.wait_for(expect, 15)
    finally:
        stream.abort()


def lease_address(dom: libvirt.virDomain, source: int, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while True:
        try:
            for iface in dom.interfaceAddresses(source).values():
                for addr in iface.get("addrs") or []:
                    if addr["type"] == libvirt.VIR_IP_ADDR_TYPE_IPV4 and not addr[
                        "addr"
                    ].startswith("127."):
                        return str(addr["addr"])
        except libvirt.libvirtError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError("no IPv4 address reported for the guest NIC")
        time.sleep(0.3)


def _report(message: str) -> None:
    print(f"[guest] {message}", file=sys.stderr)


def boot(host: Host, image: GuestImage, work: Workdir, name: str, label: str) -> tuple[
    libvirt.virDomain, SerialLog
]:
    """Start the domain and wait for /init's ready marker, reporting how long each step took."""
    log = SerialLog(work.serial_log)
    started = time.monotonic()
    dom = host.conn.createXML(domain_xml(name, image, work, host.system), 0)
    created = time.monotonic() - started
    log.wait_for(r"^HERDSMAN-GUEST: booted ", READY_TIMEOUT)
    first_line = time.monotonic() - started
    log.wait_for(r"^HERDSMAN-GUEST: ready$", READY_TIMEOUT)
    _report(
        f"{label}: createXML returned {created:.1f} s, first /init line {first_line:.1f} s, "
        f"ready {time.monotonic() - started:.1f} s"
    )
    return dom, log


def test_guest_boots_serves_and_powers_off(
    host: Host, guest: GuestImage, workdir: Workdir
) -> None:
    name = f"herdsman-test-{workdir.token}"
    token = workdir.token
    try:
        # First boot: blank root disk.
        dom, log = boot(host, guest, workdir, name, "first boot")
        out = log.text()
        assert f"HERDSMAN-GUEST: booted {guest.kernel_version}\n" in out
        assert f"HERDSMAN-GUEST: hostname guest-{token}\n" in out
        assert f"HERDSMAN-GUEST: instance-id iid-{token}\n" in out
        assert "HERDSMAN-GUEST: rootdisk formatted\n" in out
        assert f"HERDSMAN-GUEST: disk vda serial=root size={64 << 20}\n" in out
        assert f"HERDSMAN-GUEST: disk vdb serial=data size={16 << 20}\n" in out
        assert f"USERDATA-{token}-guest-{token}\n" in out
        assert "PREVIOUS-" not in out
        assert "HERDSMAN-GUEST: userdata exit 3\n" in out
        net = re.search(r"^HERDSMAN-GUEST: net eth0 (\S+)/(\d+)$", out, re.MULTILINE)
        assert net, "eth0 got no DHCP lease"

        wait_agent(dom, 30)
        code, text = agent_exec(dom, "/bin/cat", "/mnt/root/herdsman-test")
        assert (code, text) == (0, f"written-{token}\n")
        agent_ip = lease_address(dom, libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_AGENT, 10)
        assert agent_ip == net.group(1)
        if host.system:
            lease_ip = lease_address(dom, libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_LEASE, 10)
            assert lease_ip == agent_ip and lease_ip.startswith("192.168.122.")

        # The console shell reads what is typed: 6*7 only becomes 42 if the shell ran it.
        run_on_console(host.conn, dom, log, f"echo $((6*7))-{token}", rf"^42-{token}$")

        dom.shutdownFlags(libvirt.VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN)
        off_s = wait_powered_off(host.conn, name, POWER_OFF_TIMEOUT)
        assert "HERDSMAN-GUEST: poweroff\n" in log.text()
        _report(f"ACPI shutdown -> powered off in {off_s:.1f} s")

        # Second boot on the same disks: the root filesystem and its file survive, and
        # the agent's guest-shutdown powers the guest off through /sbin/shutdown.
        dom, log = boot(host, guest, workdir, name, "second boot")
        out = log.text()
        assert "HERDSMAN-GUEST: rootdisk existing\n" in out
        assert f"PREVIOUS-written-{token}\n" in out
        wait_agent(dom, 30)
        dom.shutdownFlags(libvirt.VIR_DOMAIN_SHUTDOWN_GUEST_AGENT)
        off_s = wait_powered_off(host.conn, name, POWER_OFF_TIMEOUT)
        _report(f"agent shutdown -> powered off in {off_s:.1f} s")
    finally:
        if running(host.conn, name):
            host.conn.lookupByName(name).destroy()
