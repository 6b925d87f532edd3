"""Prepare the destination host for a VM's migration, and undo it (over both libvirt connections).

What libvirt will not do for a `NON_SHARED_INC` migration (migration.md §5.2): create the
destination's disk files ("pre-creation of storage targets for incremental storage migration
is not supported"), bring the files the VM reads but never writes (kernel, initrd, the seed
ISO: "Cannot access storage file"), or bring backing images (INC copies the top layer only).
So before the migration, on the destination:

1. every such file is made to exist at the same path: copied from the source through both
   libvirtds' volume streams if missing, checked if present (same size and format; small
   files such as seeds byte for byte, since a seed is rebuilt in place with the same size);
2. every copied disk gets a fresh, empty volume with the same virtual size, format and
   backing image (for pool volumes: in the pool of the same name, defined like the source's
   if the destination has none yet). An existing one is refused, never overwritten: it is a
   previous attempt's or another VM's.

Everything made is recorded, so a failure (here or in the migration) removes exactly that and
nothing else: files that were already there stay.
"""

from __future__ import annotations

import posixpath
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Literal

import libvirt
from lxml import etree

from drivers.libvirt.migration import volumes
from drivers.libvirt.migration.disks import (DiskInfo, copied_disks, domain_disks, log_files, log_folders, required_files,
                                              unsupported)
from drivers.libvirt.migration.volumes import PreparationError, VolumeFacts

SMALL = 4 << 20  # files up to this size are compared byte for byte


@dataclass(frozen=True)
class Created:
    kind: Literal["file", "volume", "pool", "folder"]
    name: str = ""  # file or volume name, pool name
    folder: str = ""  # file: its folder; folder: the folder
    pool: str = ""  # volume: its pool


@dataclass
class Prepared:
    """What `prepare` made on the destination, in order."""

    created: list[Created] = field(default_factory=list)
    copied_bytes: int = 0  # what the migration will copy of the disks (their top layers)

    @property
    def paths(self) -> list[str]:
        return [posixpath.join(c.folder, c.name) for c in self.created if c.kind == "file"]


def prepare(src: libvirt.virConnect, dst: libvirt.virConnect, xml: str) -> Prepared:
    """Make the destination ready for the domain described by `xml` (its source's live XML)."""
    disks = domain_disks(xml)
    if problems := unsupported(disks):
        raise PreparationError("; ".join(problems))
    done = Prepared()
    try:
        for path in required_files(xml):
            ensure_file(src, dst, path, done)
        for folder in log_folders(xml):
            _make_folder(src, dst, folder, done)
        for path in log_files(xml):
            _claim_log(dst, path, done)
        for disk in copied_disks(disks):
            create_disk(src, dst, disk, done)
    except BaseException:
        undo(dst, done)
        raise
    return done


def ensure_file(src: libvirt.virConnect, dst: libvirt.virConnect, path: str, done: Prepared) -> None:
    """`path` exists on the destination with the source's content (its backing chain too)."""
    facts = volumes.file_facts(src, path)
    if facts is None:
        raise PreparationError(f"{path} does not exist on the source host")
    if facts.backing is not None:
        ensure_file(src, dst, facts.backing[0], done)
    folder, name = posixpath.split(path)
    _make_folder(src, dst, folder, done)
    with volumes.folder_pool(dst, folder) as pool:
        assert pool is not None
        existing = volumes.find(pool, name)
        if existing is not None:
            _check_same(src, facts, dst, existing)
            return
        try:
            dvol = pool.createXML(volumes.volume_xml(name, facts.physical, "raw", mode=facts.mode or "0644"), 0)
        except libvirt.libvirtError as exc:
            raise PreparationError(f"cannot create {path} on the destination: {exc.get_error_message()}") from None
        done.created.append(Created("file", name=name, folder=folder))
        with volumes.folder_pool(src, folder) as spool:
            svol = volumes.find(spool, name)
            if svol is None:
                raise PreparationError(f"{path} vanished from the source host")
            volumes.copy_stream(src, svol, dst, dvol, facts.physical)


def _claim_log(dst: libvirt.virConnect, path: str, done: Prepared) -> None:
    """A console log virtlogd will create there for the incoming VM: ours to remove if the
    migration fails (one that exists already belongs to someone else and stays)."""
    folder, name = posixpath.split(path)
    with volumes.folder_pool(dst, folder) as pool:
        if pool is not None and volumes.find(pool, name) is None:
            done.created.append(Created("file", name=name, folder=folder))


def create_disk(src: libvirt.virConnect, dst: libvirt.virConnect, disk: DiskInfo, done: Prepared) -> None:
    """An empty volume for a copied disk on the destination, like the source's (size, backing)."""
    target: AbstractContextManager[libvirt.virStoragePool | None]
    if disk.source_type == "volume":
        assert disk.pool and disk.volume
        facts = volumes.facts(src.storagePoolLookupByName(disk.pool).storageVolLookupByName(disk.volume))
        target, name, where = nullcontext(_dest_pool(src, dst, disk.pool, done)), disk.volume, disk.pool
    else:
        assert disk.path
        found = volumes.file_facts(src, disk.path)
        if found is None:
            raise PreparationError(f"{disk.describe} does not exist on the source host")
        facts = found
        folder, name = posixpath.split(disk.path)
        _make_folder(src, dst, folder, done)
        target, where = volumes.folder_pool(dst, folder), folder
    if facts.backing is not None:
        ensure_file(src, dst, facts.backing[0], done)
    done.copied_bytes += facts.physical
    with target as pool:
        assert pool is not None
        if volumes.find(pool, name) is not None:
            raise PreparationError(f"{disk.describe} already exists on the destination (a previous attempt "
                                   "or another VM's disk); it is not overwritten")
        xml = volumes.volume_xml(name, facts.capacity, facts.format, mode=facts.mode or "0600",
                                 backing=facts.backing)
        try:
            pool.createXML(xml, 0)
        except libvirt.libvirtError as exc:
            raise PreparationError(f"cannot create {disk.describe} on the destination: "
                                   f"{exc.get_error_message()}") from None
        if disk.source_type == "volume":
            done.created.append(Created("volume", name=name, pool=where))
        else:
            done.created.append(Created("file", name=name, folder=where))


def undo(dst: libvirt.virConnect, done: Prepared) -> None:
    """Remove what `prepare` made on the destination, newest first; raise after trying all."""
    failures = []
    for item in reversed(done.created):
        try:
            _remove(dst, item)
        except libvirt.libvirtError as exc:
            failures.append(f"{item.kind} {item.folder or item.pool}/{item.name}: {exc.get_error_message()}")
    done.created.clear()
    if failures:
        raise PreparationError("could not remove from the destination: " + "; ".join(failures))


def _remove(dst: libvirt.virConnect, item: Created) -> None:
    if item.kind == "file":
        with volumes.folder_pool(dst, item.folder) as pool:
            if (vol := volumes.find(pool, item.name)) is not None:
                vol.delete(0)
    elif item.kind == "volume":
        pool = dst.storagePoolLookupByName(item.pool)
        if (vol := volumes.find(pool, item.name)) is not None:
            vol.delete(0)
    elif item.kind == "pool":
        pool = dst.storagePoolLookupByName(item.name)
        if pool.isActive():
            pool.destroy()
        pool.undefine()
    else:
        volumes.remove_folder(dst, item.folder)


def _make_folder(src: libvirt.virConnect, dst: libvirt.virConnect, folder: str, done: Prepared) -> None:
    """The folder on the destination, with the source's mode if it must be made (seeds: 0711)."""
    with volumes.folder_pool(dst, folder) as pool:
        if pool is not None:
            return
    mode = volumes.folder_mode(src, folder) or "0755"
    done.created += [Created("folder", folder=made) for made in volumes.make_folder(dst, folder, mode)]


def _check_same(src: libvirt.virConnect, facts: VolumeFacts, dst: libvirt.virConnect,
                existing: libvirt.virStorageVol) -> None:
    there = volumes.facts(existing)
    if (there.physical, there.format) != (facts.physical, facts.format):
        raise PreparationError(
            f"{facts.path} exists on the destination but differs from the source's "
            f"({there.format}, {there.physical} bytes there; {facts.format}, {facts.physical} bytes here)")
    if facts.physical <= SMALL:
        folder, name = posixpath.split(facts.path)
        with volumes.folder_pool(src, folder) as spool:
            svol = volumes.find(spool, name)
            assert svol is not None
            if volumes.read_bytes(src, svol, facts.physical) != volumes.read_bytes(dst, existing, there.physical):
                raise PreparationError(f"{facts.path} exists on the destination with other content "
                                       "than the source's")


def _dest_pool(src: libvirt.virConnect, dst: libvirt.virConnect, name: str, done: Prepared
               ) -> libvirt.virStoragePool:
    """The destination's pool `name`; a dir pool like the source's is defined if it has none."""
    try:
        pool = dst.storagePoolLookupByName(name)
    except libvirt.libvirtError:
        pool = None
    if pool is None:
        source = etree.fromstring(src.storagePoolLookupByName(name).XMLDesc(0).encode())
        path = source.findtext("./target/path")
        if source.get("type") != "dir" or not path:
            raise PreparationError(f"the destination has no storage pool {name!r}")
        _make_folder(src, dst, path, done)  # before the pool exists: libvirt allows one pool per folder
        xml = (f"<pool type='dir'><name>{volumes._escape(name)}</name><target><path>"
               f"{volumes._escape(path)}</path><permissions><mode>"
               f"{source.findtext('./target/permissions/mode') or '0711'}</mode></permissions></target></pool>")
        pool = dst.storagePoolDefineXML(xml, 0)
        done.created.append(Created("pool", name=name))
        pool.setAutostart(True)
    if not pool.isActive():
        try:
            pool.create(0)
        except libvirt.libvirtError:
            pool.build(0)  # an inactive pool whose folder is gone
            pool.create(0)
    pool.refresh(0)
    return pool
