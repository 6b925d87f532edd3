"""A real guest kernel finds our seed by its `cidata` label and reads every file byte-exact.

The host kernel here may lack iso9660, so the proof that Linux reads our Rock Ridge names
and contents comes from the test guest (tests/guest): its /init mounts LABEL=cidata, sets
the hostname from meta-data and runs a `#!` user-data, which prints the files' sha256.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import time
import uuid
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

import pytest

from drivers.libvirt.seed import SeedInputs, render_seed_files, write_seed

pytestmark = [pytest.mark.libvirtd, pytest.mark.guest, pytest.mark.timeout(420)]

libvirt = pytest.importorskip("libvirt")

USERDATA = (
    "#!/bin/sh\n"
    "# <>&'\"]]> ünïcødé ✓ \x01\x1b[0m\r\n"
    "for f in user-data meta-data network-config; do\n"
    '  echo "SEEDSUM $f $(sha256sum /mnt/seed/$f | cut -c1-64)"\n'
    "done\n"
)


def _domain_xml(name: str, kernel: Path, initrd: Path, cmdline: str, seed: Path, log: Path) -> str:
    return f"""<domain type='qemu'>
  <name>{escape(name)}</name>
  <memory unit='MiB'>128</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{escape(str(kernel))}</kernel>
    <initrd>{escape(str(initrd))}</initrd>
    <cmdline>{escape(cmdline)}</cmdline>
  </os>
  <features><acpi/><tcg><tb-cache unit='MiB'>32</tb-cache></tcg></features>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <disk type='file' device='cdrom'>
      <driver name='qemu' type='raw'/>
      <source file={quoteattr(str(seed))}/>
      <target dev='hdc' bus='ide'/>
      <readonly/>
    </disk>
    <serial type='file'><source path={quoteattr(str(log))}/><target port='0'/></serial>
  </devices>
</domain>"""


@pytest.fixture()
def conn():
    try:
        c = libvirt.open("qemu:///system")
    except libvirt.libvirtError as exc:
        pytest.skip(f"qemu:///system is not available (run scripts/libvirt-up): {exc}")
    yield c
    c.close()


def test_guest_mounts_the_seed_and_reads_it_byte_exact(conn):
    try:
        from tests.guest.build import ensure_guest
    except ImportError:  # pytest put tests/ itself on sys.path
        from guest.build import ensure_guest

    guest = ensure_guest()
    inputs = SeedInputs(
        instance_id=str(uuid.uuid4()),
        hostname="seedtest",
        domain_name="example.com",
        userdata=USERDATA,
        dns=("192.0.2.53",),
        macs=("52:54:00:12:34:56",),
    )
    files = render_seed_files(inputs)
    work = Path(tempfile.mkdtemp(prefix="herdsman-seed-"))
    work.chmod(0o755)  # qemu runs as another user under qemu:///system
    seed, log = work / "seed.iso", work / "console.log"
    name = f"herdsman-seedtest-{os.getpid()}"
    dom = None
    try:
        write_seed(seed, inputs, mode=0o644)
        dom = conn.createXML(_domain_xml(name, guest.kernel, guest.initrd, guest.cmdline, seed, log))
        deadline = time.monotonic() + 120
        text = ""
        while time.monotonic() < deadline:
            text = log.read_text("utf-8", "replace") if log.exists() else ""
            if "HERDSMAN-GUEST: ready" in text:
                break
            time.sleep(0.5)
        assert "HERDSMAN-GUEST: ready" in text, text[-2000:]
        assert "HERDSMAN-GUEST: hostname seedtest.example.com" in text
        assert f"HERDSMAN-GUEST: instance-id {inputs.instance_id}" in text
        sums = dict(re.findall(r"SEEDSUM (\S+) ([0-9a-f]{64})", text))
        assert sums == {n: hashlib.sha256(d).hexdigest() for n, d in files.items()}
        assert "HERDSMAN-GUEST: userdata exit 0" in text
    finally:
        if dom is not None:
            try:
                dom.destroy()
            except libvirt.libvirtError:
                pass  # already gone
        for p in (seed, log):
            p.unlink(missing_ok=True)
        work.rmdir()
