"""The real test guest (tests/guest) set up to migrate between test hosts.

Its root disk is a qcow2 overlay on a base image that holds an ext2 filesystem with a marker
file; base and NoCloud seed sit at the same path on every host, as a real host's image cache
and seed dir would. Its user-data starts a heartbeat: every 200 ms a line `tick N up=S`
on the serial console and appended to /mnt/root/ticks (synced every 5 ticks), and busybox
httpd on port 8080 serving the guest's token. So after a move a test can check that the
guest kept running (ticks continue, uptime not reset), that its disk came along (every tick
line is in the file, read back after dropping the guest's page cache), that the base image
is readable on the new host (the marker), and that its NIC works there (HTTP from the root
namespace to its DHCP address). With a `beacon` address, the guest also writes a line to a TCP
connection there every 20 ms: the gaps in their arrival are the guest's own downtime
(bench/migrate.py; busybox's nc here has no UDP).
"""

from __future__ import annotations

import re
import secrets
import shutil
import subprocess
import tempfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from tests.guest.build import GuestImage
from tests.hosts.host import Host

IMAGES = PurePosixPath("/var/lib/libvirt/images")
SERIAL_DIR = PurePosixPath("/var/log/libvirt/qemu")
HTTP_PORT = 8080
DISK_MIB = 64
TICK = re.compile(r"^tick (\d+) up=([\d.]+)\r?$", re.MULTILINE)

USERDATA = """#!/bin/sh
echo "BASE-MARKER $(cat /mnt/root/base-marker)"
mkdir -p /tmp/www && echo "{token}" >/tmp/www/index.html && httpd -p {port} -h /tmp/www
(
    sleep 1  # after /init's last lines, which would interleave with the first ticks
    n=0
    while :; do
        line="tick $n up=$(cut -d' ' -f1 /proc/uptime)"
        echo "$line"
        echo "$line" >>/mnt/root/ticks
        [ $((n % 5)) -eq 4 ] && sync
        n=$((n + 1))
        sleep 0.2
    done
) </dev/null >/dev/console 2>&1 &
{beacon}echo HEARTBEAT-STARTED
"""
#: A line every 20 ms from a loop the guest runs, so a pause of the guest is a gap in what arrives.
BEACON = """(
    while ! ip -4 addr show | grep -q 'scope global'; do sleep 0.2; done
    while :; do echo b; usleep 20000; done | nc {address} {port}
) </dev/null >/dev/null 2>&1 &
"""


@dataclass(frozen=True)
class MigratableGuest:
    name: str
    token: str
    image: GuestImage
    memory_mib: int = 128
    beacon: tuple[str, int] | None = None  # (address, TCP port) the guest writes to every 20 ms

    @property
    def dir(self) -> PurePosixPath:
        """The guest's folder on every host (same path everywhere)."""
        return IMAGES / self.name

    @property
    def base(self) -> PurePosixPath:
        return self.dir / "base.qcow2"

    @property
    def overlay(self) -> PurePosixPath:
        return self.dir / "root.qcow2"

    @property
    def seed(self) -> PurePosixPath:
        return self.dir / "seed.iso"

    @property
    def serial_log(self) -> PurePosixPath:
        return SERIAL_DIR / f"{self.name}-serial.log"

    @classmethod
    def new(cls, image: GuestImage, prefix: str = "hmguest", memory_mib: int = 128,
            beacon: tuple[str, int] | None = None) -> MigratableGuest:
        token = secrets.token_hex(4)
        return cls(f"{prefix}-{token}", token, image, memory_mib, beacon)

    # -- files ------------------------------------------------------------------------------

    def place(self, hosts: list[Host], *, overlay_on: Host) -> None:
        """Base image and seed on every host (byte-identical); the overlay on `overlay_on`."""
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            self._make_base(work)
            self._make_seed(work)
            for host in hosts:
                folder = host.path(self.dir)
                folder.mkdir(mode=0o755, parents=True, exist_ok=True)
                for name in ("base.qcow2", "seed.iso"):
                    shutil.copyfile(work / name, folder / name)
                    (folder / name).chmod(0o644)
        self.create_overlay(overlay_on)

    def create_overlay(self, host: Host) -> None:
        """A fresh overlay on the base, made on `host` itself (as its libvirt would see it)."""
        host.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(self.base),
                  str(self.overlay), f"{DISK_MIB}M"])

    def remove_files(self, hosts: list[Host]) -> None:
        for host in hosts:
            shutil.rmtree(host.path(self.dir), ignore_errors=True)
            host.path(self.serial_log).unlink(missing_ok=True)

    def _make_base(self, work: Path) -> None:
        tree = work / "tree"
        tree.mkdir()
        (tree / "base-marker").write_text(f"base-{self.token}\n")
        raw = work / "base.raw"
        _run(["mke2fs", "-q", "-t", "ext2", "-L", "herdsman-root", "-d", str(tree), str(raw),
              f"{DISK_MIB}M"])
        _run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw), str(work / "base.qcow2")])

    def _make_seed(self, work: Path) -> None:
        src = work / "seed"
        src.mkdir()
        (src / "meta-data").write_text(f"instance-id: {self.name}\nlocal-hostname: {self.name}\n")
        beacon = BEACON.format(address=self.beacon[0], port=self.beacon[1]) if self.beacon else ""
        (src / "user-data").write_text(USERDATA.format(token=self.token, port=HTTP_PORT, beacon=beacon))
        _run(["genisoimage", "-quiet", "-o", str(work / "seed.iso"), "-V", "cidata", "-J", "-r",
              str(src / "user-data"), str(src / "meta-data")])

    # -- domain -----------------------------------------------------------------------------

    def domain_xml(self, bridge: str) -> str:
        """TCG, machine pc, direct kernel boot; the overlay on virtio, the seed on an IDE cdrom,
        a NIC on the host bridge, the serial console logged by virtlogd, the guest agent."""
        dom = ET.Element("domain", type="qemu")
        ET.SubElement(dom, "name").text = self.name
        ET.SubElement(dom, "memory", unit="MiB").text = str(self.memory_mib)
        ET.SubElement(dom, "vcpu").text = "1"
        os_el = ET.SubElement(dom, "os")
        ET.SubElement(os_el, "type", arch="x86_64", machine="pc").text = "hvm"
        ET.SubElement(os_el, "kernel").text = str(self.image.kernel)
        ET.SubElement(os_el, "initrd").text = str(self.image.initrd)
        ET.SubElement(os_el, "cmdline").text = self.image.cmdline
        features = ET.SubElement(dom, "features")
        ET.SubElement(features, "acpi")
        ET.SubElement(features, "apic")
        tcg = ET.SubElement(features, "tcg")
        ET.SubElement(tcg, "tb-cache", unit="MiB").text = "32"
        ET.SubElement(dom, "on_crash").text = "destroy"
        devices = ET.SubElement(dom, "devices")
        disk = ET.SubElement(devices, "disk", type="file", device="disk")
        ET.SubElement(disk, "driver", name="qemu", type="qcow2")
        ET.SubElement(disk, "source", file=str(self.overlay))
        ET.SubElement(disk, "target", dev="vda", bus="virtio")
        ET.SubElement(disk, "serial").text = "root"
        cdrom = ET.SubElement(devices, "disk", type="file", device="cdrom")
        ET.SubElement(cdrom, "driver", name="qemu", type="raw")
        ET.SubElement(cdrom, "source", file=str(self.seed))
        ET.SubElement(cdrom, "target", dev="hdc", bus="ide")
        ET.SubElement(cdrom, "readonly")
        nic = ET.SubElement(devices, "interface", type="bridge")
        ET.SubElement(nic, "source", bridge=bridge)
        ET.SubElement(nic, "model", type="virtio")
        serial = ET.SubElement(devices, "serial", type="pty")
        ET.SubElement(serial, "log", file=str(self.serial_log), append="on")
        ET.SubElement(serial, "target", port="0")
        console = ET.SubElement(devices, "console", type="pty")
        ET.SubElement(console, "target", type="serial", port="0")
        channel = ET.SubElement(devices, "channel", type="unix")
        ET.SubElement(channel, "target", type="virtio", name="org.qemu.guest_agent.0")
        ET.SubElement(devices, "memballoon", model="none")
        return ET.tostring(dom, encoding="unicode")

    def serial_text(self, host: Host) -> str:
        try:
            return host.path(self.serial_log).read_bytes().decode("utf-8", "replace").replace("\r", "")
        except FileNotFoundError:
            return ""


def ticks(text: str) -> list[tuple[int, float]]:
    """The heartbeat lines in `text` after /init's `ready`, as (number, guest uptime in s)."""
    _, marker, rest = text.partition("HERDSMAN-GUEST: ready\n")
    return [(int(n), float(up)) for n, up in TICK.findall(rest if marker else text)]


def _run(argv: list[str]) -> None:
    result = subprocess.run(argv, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {result.stderr.strip()}")
