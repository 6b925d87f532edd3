"""Volumes through libvirt's storage pool API: created by name, never by a user's path."""

from __future__ import annotations

import os
from pathlib import Path

import libvirt
from lxml import etree

from drivers.base import DriverError


def _pool_xml(name: str, path: Path) -> str:
    pool = etree.Element("pool", type="dir")
    etree.SubElement(pool, "name").text = name
    target = etree.SubElement(pool, "target")
    etree.SubElement(target, "path").text = str(path)
    return etree.tostring(pool, encoding="unicode")


def ensure_pool(conn: libvirt.virConnect, name: str, path: Path) -> libvirt.virStoragePool:
    """The agent's directory pool, defined, autostarted and active (idempotent, and safe when
    several worker threads or processes ask at once: the loser of a race uses the winner's)."""
    local = not conn.getURI().startswith("test:")
    try:
        pool = conn.storagePoolLookupByName(name)
    except libvirt.libvirtError:
        try:
            pool = conn.storagePoolDefineXML(_pool_xml(name, path), 0)
            pool.setAutostart(True)
        except libvirt.libvirtError:
            pool = conn.storagePoolLookupByName(name)  # defined meanwhile; else the first error stands
    if not pool.isActive():
        if local:
            # an operator may have wiped the state dir: the pool's folder comes back empty
            os.makedirs(path, mode=0o711, exist_ok=True)
        _activate(pool)
    return pool


def _activate(pool: libvirt.virStoragePool) -> None:
    try:
        pool.create(0)
    except libvirt.libvirtError:
        if not pool.isActive():  # started meanwhile by a concurrent call is fine
            raise


def lookup_pool(conn: libvirt.virConnect, name: str) -> libvirt.virStoragePool:
    try:
        pool = conn.storagePoolLookupByName(name)
    except libvirt.libvirtError:
        raise DriverError(f"storage pool {name!r} does not exist on this host") from None
    if not pool.isActive():
        _activate(pool)
    return pool


def volume_xml(name: str, capacity: int, fmt: str, backing: tuple[str, str] | None = None) -> str:
    vol = etree.Element("volume")
    etree.SubElement(vol, "name").text = name
    etree.SubElement(vol, "capacity", unit="bytes").text = str(capacity)
    target = etree.SubElement(vol, "target")
    etree.SubElement(target, "format", type=fmt)
    etree.SubElement(target, "permissions").append(_mode("0600"))
    if backing is not None:
        store = etree.SubElement(vol, "backingStore")
        etree.SubElement(store, "path").text = backing[0]
        etree.SubElement(store, "format", type=backing[1])
    return etree.tostring(vol, encoding="unicode")


def _mode(value: str) -> etree._Element:
    mode = etree.Element("mode")
    mode.text = value
    return mode


def find_volume(pool: libvirt.virStoragePool, name: str) -> libvirt.virStorageVol | None:
    try:
        return pool.storageVolLookupByName(name)
    except libvirt.libvirtError:
        return None


def ensure_volume(pool: libvirt.virStoragePool, name: str, capacity: int, fmt: str) -> tuple[libvirt.virStorageVol, bool]:
    """A blank volume of `capacity` bytes; an existing one is kept (it holds the VM's data)."""
    try:
        return pool.storageVolLookupByName(name), False
    except libvirt.libvirtError:
        pass
    check_free_space(pool, capacity, name)
    return pool.createXML(volume_xml(name, capacity, fmt), 0), True


def check_free_space(pool: libvirt.virStoragePool, capacity: int, name: str) -> None:
    """Thin volumes would be created anyway; refuse one the pool could never hold."""
    pool.refresh(0)
    available = pool.info()[3]
    if capacity > available:
        raise DriverError(
            f"disk {name}: {capacity} bytes do not fit in storage pool {pool.name()!r} "
            f"({available} bytes free)"
        )


def delete_volumes(conn: libvirt.virConnect, pool_names: set[str], prefix: str) -> list[str]:
    """Delete every volume whose name starts with `prefix` in the given pools; returns their names."""
    deleted = []
    for pool_name in sorted(pool_names):
        try:
            pool = conn.storagePoolLookupByName(pool_name)
        except libvirt.libvirtError:
            continue
        if not pool.isActive():
            continue
        pool.refresh(0)
        for vol in pool.listAllVolumes(0):
            if vol.name().startswith(prefix):
                vol.delete(0)
                deleted.append(vol.name())
    return deleted
