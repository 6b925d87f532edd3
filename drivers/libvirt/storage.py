"""Volumes through libvirt's storage pool API: created by name, never by a user's path."""

from __future__ import annotations

import os
from pathlib import Path

import libvirt
from lxml import etree

from drivers.base import DriverError
from drivers.libvirt.host_dirs import make_dir


def _pool_xml(name: str, path: Path) -> str:
    pool = etree.Element("pool", type="dir")
    etree.SubElement(pool, "name").text = name
    target = etree.SubElement(pool, "target")
    etree.SubElement(target, "path").text = str(path)
    return etree.tostring(pool, encoding="unicode")


def pool_path(pool: libvirt.virStoragePool) -> Path:
    return Path(etree.fromstring(pool.XMLDesc(0).encode()).findtext("target/path") or "")


def reconcile_pool(conn: libvirt.virConnect, name: str, path: Path) -> str:
    """Make sure pool `name` is the one at `path` (this agent's state dir); returns what was done.

    libvirt's pools are global but the agent's pool path is per state dir: after a move of the
    state dir the old definition still points at the old folder. When that folder is gone or
    empty, nothing can depend on the pool, so it is defined again at `path`. When it still holds
    files (volumes of VMs that may be running), using it silently would put new VMs in the old
    place and repointing would lose the old ones, so a PoolElsewhere error says what to do.
    """
    try:
        pool = conn.storagePoolLookupByName(name)
    except libvirt.libvirtError:
        other = _pool_at(conn, path)
        if other is not None:  # libvirt refuses two pools on one folder: say which, and what to do
            raise PoolElsewhere(
                f"this agent's pool folder {path} belongs to storage pool {other!r}, not {name!r}: VMs "
                f"already there keep running, new ones are refused. Fix: start the agent with "
                f"--storage-pool {other}, or give it another --state-dir") from None
        return ""  # defined on first use
    current = pool_path(pool)
    if os.path.normpath(current) == os.path.normpath(path):
        return ""
    held = sorted(e.name for e in current.iterdir() if e.name != ".work") if current.is_dir() else []
    if held:
        shown = ", ".join(held[:3]) + (f" and {len(held) - 3} more" if len(held) > 3 else "")
        raise PoolElsewhere(
            f"storage pool {name!r} is at {current} and holds {len(held)} files ({shown}), but this agent's "
            f"state dir puts it at {path}: VMs already there keep running, new ones are refused. Fix: start "
            f"the agent with --state-dir {current.parent}, or give it another --storage-pool, or move the "
            f"files to {path} and run: virsh pool-destroy {name}; virsh pool-undefine {name}")
    if pool.isActive():
        pool.destroy()
    pool.undefine()
    ensure_pool(conn, name, path)
    return f"storage pool {name!r} moved from {current} (gone or empty) to {path}"


def _pool_at(conn: libvirt.virConnect, path: Path) -> str | None:
    for pool in conn.listAllStoragePools(0):
        if os.path.normpath(pool_path(pool)) == os.path.normpath(path):
            return str(pool.name())
    return None


class PoolElsewhere(DriverError):
    """The agent's pool is defined at another folder that still holds files."""


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
            make_dir(path)
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
