"""The destination's live definition when copied disks are pool volumes (pure functions).

libvirt 9.0 checks on the destination, before an incremental disk copy (NON_SHARED_INC),
that each copied disk's file exists, by its path. A `type='volume'` disk has no path there yet
(pools are resolved when a domain starts, not when a migration prepares), so libvirt takes
it as missing and refuses: "pre-creation of storage targets for incremental storage
migration is not supported", although `destination.prepare` made the volume. So the live
definition sent to the destination (`destination_xml`) names those disks by the file of the
volume there (`type='file'`); the persistent one (`persistent_xml`) keeps the pool volumes, so
the VM is defined there as it was here and its next cold start resolves them again.
"""

from __future__ import annotations

import libvirt
from lxml import etree

from drivers.libvirt.migration.disks import DiskInfo


def volume_paths(dst: libvirt.virConnect, disks: list[DiskInfo]) -> dict[str, str]:
    """target → the file of its volume on the destination, for copied volume disks."""
    paths = {}
    for disk in disks:
        if disk.copied and disk.source_type == "volume" and disk.pool and disk.volume:
            paths[disk.target] = dst.storagePoolLookupByName(disk.pool).storageVolLookupByName(disk.volume).path()
    return paths


def with_file_disks(xml: str, paths: dict[str, str]) -> str:
    """`xml` with each volume disk whose target is in `paths` turned into a file disk there."""
    root = etree.fromstring(xml.encode())
    for node in root.findall("./devices/disk"):
        target = node.find("target")
        dev = target.get("dev") if target is not None else None
        if node.get("type") != "volume" or dev not in paths:
            continue
        node.set("type", "file")
        source = node.find("source")
        assert source is not None
        for attr in list(source.attrib):
            del source.attrib[attr]
        source.set("file", paths[dev])
    return etree.tostring(root, encoding="unicode")
