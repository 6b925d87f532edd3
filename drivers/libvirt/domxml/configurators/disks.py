"""The VM's volumes: pool + volume name from the instance uuid and disk name, iotune, serials."""

from __future__ import annotations

import string

from drivers.libvirt.domxml.inputs import RenderInput
from drivers.libvirt.domxml.model import Disk, Domain

_PREFIX = {"virtio": "vd", "scsi": "sd", "sata": "sd"}


def device_name(prefix: str, index: int) -> str:
    """vda, vdb, ... vdz, vdaa — libvirt's naming of the index-th disk on a bus."""
    letters = string.ascii_lowercase
    name = ""
    index += 1
    while index:
        index, rem = divmod(index - 1, 26)
        name = letters[rem] + name
    return prefix + name


def configure(inp: RenderInput, dom: Domain) -> None:
    used: dict[str, int] = {}
    for disk in inp.spec.ordered_disks:
        opts = disk.opts
        prefix = _PREFIX[opts.bus]
        index = used.get(prefix, 0)
        used[prefix] = index + 1
        # A root disk on an image is a qcow2 overlay (the spec refuses raw there); a root disk
        # without an image is blank and keeps the format its opts ask for.
        fmt = opts.format
        iotune = {}
        if disk.read_iops:
            iotune["read_iops_sec"] = disk.read_iops
        if disk.write_iops:
            iotune["write_iops_sec"] = disk.write_iops
        dom.disks.append(
            Disk(
                target_dev=device_name(prefix, index),
                bus=opts.bus,
                pool=inp.disk_pool(disk),
                volume=inp.layout.volume_name(inp.uuid, disk.name, fmt),
                driver_type=fmt,
                cache=opts.cache,
                discard=opts.discard,
                # the disk's name is its serial: the guest finds it as /dev/disk/by-id/virtio-<name>
                serial=disk.name,
                boot_order=1 if disk.root else None,
                iotune=iotune,
            )
        )
    dom.scsi_controller = any(d.bus == "scsi" for d in dom.disks)
