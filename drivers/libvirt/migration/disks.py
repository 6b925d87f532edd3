"""What a domain's storage means for a migration, read from its XML (pure functions).

Copied disks (NON_SHARED_INC, listed in migrate_disks) are the writable local ones: device
`disk`, not read-only, not shareable, backed by a file, a block device or a pool volume.
Everything else a domain reads from the host (kernel, initrd, read-only images such as the
NoCloud seed) is never copied by libvirt and must already exist on the destination; so must
the backing images of copied disks (INC copies only the top layer).
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass

from lxml import etree

_LOCAL = ("file", "block", "volume")


@dataclass(frozen=True)
class DiskInfo:
    target: str  # vda, hdc, ...
    device: str  # disk, cdrom, floppy, lun
    source_type: str  # file, block, volume, network, ...
    path: str | None = None  # file or block device
    pool: str | None = None  # volume disks
    volume: str | None = None
    format: str | None = None
    readonly: bool = False
    shareable: bool = False

    @property
    def has_source(self) -> bool:
        return bool(self.path or (self.pool and self.volume))

    @property
    def copied(self) -> bool:
        """Whether a migration copies this disk (it is the VM's own writable local storage)."""
        return (self.device == "disk" and not self.readonly and not self.shareable
                and self.source_type in _LOCAL and self.has_source)

    @property
    def describe(self) -> str:
        where = self.path or f"{self.pool}/{self.volume}"
        return f"disk {self.target} ({where})"


def domain_disks(xml: str) -> list[DiskInfo]:
    """Every <disk> of a domain, in document order."""
    root = etree.fromstring(xml.encode())
    disks = []
    for node in root.findall("./devices/disk"):
        source = node.find("source")
        target = node.find("target")
        driver = node.find("driver")
        kind = node.get("type", "file")
        path = pool = volume = None
        if source is not None:
            if kind == "file":
                path = source.get("file")
            elif kind == "block":
                path = source.get("dev")
            elif kind == "volume":
                pool, volume = source.get("pool"), source.get("volume")
        disks.append(DiskInfo(
            target=target.get("dev", "") if target is not None else "",
            device=node.get("device", "disk"),
            source_type=kind,
            path=path,
            pool=pool,
            volume=volume,
            format=driver.get("type") if driver is not None else None,
            readonly=node.find("readonly") is not None,
            shareable=node.find("shareable") is not None,
        ))
    return disks


def copied_disks(disks: list[DiskInfo]) -> list[DiskInfo]:
    return [d for d in disks if d.copied]


def required_files(xml: str) -> list[str]:
    """Host files the domain opens that a migration does not bring: boot files and read-only
    local file disks (the seed ISO). Backing images are resolved from the volumes themselves."""
    root = etree.fromstring(xml.encode())
    files = [el.text.strip() for el in root.findall("./os/*")
             if el.tag in ("kernel", "initrd", "dtb") and el.text and el.text.strip()]
    for disk in domain_disks(xml):
        if not disk.copied and disk.source_type == "file" and disk.path:
            files.append(disk.path)
    return list(dict.fromkeys(files))


def unsupported(disks: list[DiskInfo]) -> list[str]:
    """Why a domain's disks cannot be migrated by us, one message per disk (empty: fine)."""
    problems = []
    for disk in copied_disks(disks):
        if disk.source_type == "block":
            problems.append(f"{disk.describe} is a block device: the destination cannot be "
                            "prepared for it through a storage pool")
    for disk in disks:
        if not disk.copied and disk.source_type == "volume" and disk.has_source:
            problems.append(f"{disk.describe} is a read-only or shared pool volume: not supported")
    return problems


def log_files(xml: str) -> list[str]:
    """The files character devices log to (the serial console's `<log file>`)."""
    root = etree.fromstring(xml.encode())
    return list(dict.fromkeys(f for el in root.findall("./devices/*/log") if (f := el.get("file", "")).startswith("/")))


def log_folders(xml: str) -> list[str]:
    """Folders of the files character devices log to (the serial console's `<log file>`):
    virtlogd on the destination creates the file, not its folder."""
    root = etree.fromstring(xml.encode())
    folders = [posixpath.dirname(el.get("file", "")) for el in root.findall("./devices/*/log")]
    return list(dict.fromkeys(f for f in folders if f.startswith("/")))
