"""The cloud-init NoCloud seed, attached read-only for the VM's whole life."""

from __future__ import annotations

from drivers.libvirt.domxml.configurators.disks import device_name
from drivers.libvirt.domxml.inputs import RenderInput
from drivers.libvirt.domxml.model import Disk, Domain


def seed_bus(machine: str) -> str:
    """IDE on i440fx machines (works even with kernels lacking AHCI), SATA on q35 (no IDE there)."""
    return "sata" if "q35" in machine else "ide"


def configure(inp: RenderInput, dom: Domain) -> None:
    bus = seed_bus(dom.os.machine)
    if bus == "ide":
        target = "hdc"  # secondary master: /dev/sr0 in the guest, as on most clouds
    else:
        taken = sum(1 for d in dom.disks if d.target_dev.startswith("sd"))
        target = device_name("sd", taken)
    dom.disks.append(
        Disk(
            target_dev=target,
            bus=bus,
            device="cdrom",
            source_type="file",
            file=str(inp.layout.seed_path(inp.uuid)),
            driver_type="raw",
            readonly=True,
        )
    )
