"""Files on a host, reached only through its libvirt connection (storage pools and streams).

Migration prepares a destination that may be another machine: the only channel we have to
it is its libvirtd. A file in a folder no pool covers is reached through a transient dir
pool made for the occasion and destroyed afterwards (libvirt refuses a second pool on the
same folder, so an existing one is used instead; nothing here ever deletes a pool's files
or folder unless it created them).
"""

from __future__ import annotations

import hashlib
import posixpath
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import libvirt
from lxml import etree

from drivers.base import DriverError

CHUNK = 1 << 20
_locks: dict[tuple[str, str], threading.RLock] = {}
_locks_guard = threading.Lock()


class PreparationError(DriverError):
    """The destination could not be prepared (the message names the file and why)."""


@dataclass(frozen=True)
class VolumeFacts:
    path: str
    capacity: int  # virtual size
    physical: int  # bytes in the file
    format: str
    mode: str | None
    backing: tuple[str, str] | None  # (path, format) of the backing image, if any


def facts(vol: libvirt.virStorageVol) -> VolumeFacts:
    root = etree.fromstring(vol.XMLDesc(0).encode())
    backing = None
    if (path := root.findtext("./backingStore/path")) is not None:
        fmt = root.find("./backingStore/format")
        backing = (path, fmt.get("type") if fmt is not None else "raw")
    fmt = root.find("./target/format")
    return VolumeFacts(
        path=root.findtext("./target/path") or vol.path(),
        capacity=int(root.findtext("capacity") or 0),
        physical=int(root.findtext("physical") or root.findtext("capacity") or 0),
        format=fmt.get("type") if fmt is not None else "raw",
        mode=root.findtext("./target/permissions/mode"),
        backing=backing,
    )


def pool_path(pool: libvirt.virStoragePool) -> str | None:
    return etree.fromstring(pool.XMLDesc(0).encode()).findtext("./target/path")


def _lock(conn: libvirt.virConnect, folder: str) -> threading.RLock:
    with _locks_guard:
        return _locks.setdefault((conn.getURI(), folder), threading.RLock())


def _active_pool_for(conn: libvirt.virConnect, folder: str) -> libvirt.virStoragePool | None:
    for pool in conn.listAllStoragePools(libvirt.VIR_CONNECT_LIST_STORAGE_POOLS_ACTIVE):
        if pool_path(pool) == folder:
            return pool
    return None


@contextmanager
def folder_pool(conn: libvirt.virConnect, folder: str, *, build: bool = False, mode: str = "0755"
                ) -> Iterator[libvirt.virStoragePool | None]:
    """An active dir pool on `folder`: the host's own if it has one, else a transient one.

    Yields None when the folder does not exist; `build` makes it (and its parents, `mode`) first.
    """
    folder = posixpath.normpath(folder)
    xml = _pool_xml("herdsman-migrate-", folder, mode)
    with _lock(conn, folder):
        for _ in range(3):
            existing = _active_pool_for(conn, folder)
            if existing is not None:
                existing.refresh(0)
                yield existing
                return
            try:
                pool = conn.storagePoolCreateXML(xml, libvirt.VIR_STORAGE_POOL_CREATE_WITH_BUILD if build else 0)
            except libvirt.libvirtError as exc:
                message = exc.get_error_message() or ""
                if "conflict" in message and _active_pool_for(conn, folder) is not None:
                    continue  # another client made a pool on it just now: use that one
                if not build and exc.get_error_code() == libvirt.VIR_ERR_SYSTEM_ERROR and "No such file" in message:
                    yield None
                    return
                raise PreparationError(f"cannot open folder {folder} on {conn.getHostname()}: {message}") from None
            try:
                yield pool
            finally:
                try:
                    pool.destroy()
                except libvirt.libvirtError:
                    pass
            return
        raise PreparationError(f"cannot open folder {folder} on {conn.getHostname()}: its pools keep changing")


def active_pool_for(conn: libvirt.virConnect, folder: str) -> libvirt.virStoragePool | None:
    return _active_pool_for(conn, posixpath.normpath(folder))


def folder_mode(conn: libvirt.virConnect, folder: str) -> str | None:
    """The folder's permission bits (`0711`), None when it does not exist."""
    with folder_pool(conn, folder) as pool:
        if pool is None:
            return None
        return etree.fromstring(pool.XMLDesc(0).encode()).findtext("./target/permissions/mode")


def make_folder(conn: libvirt.virConnect, folder: str, mode: str = "0755") -> list[str]:
    """Make `folder` (with missing parents, `mode`) unless it exists; return the folders this
    call made, outermost first, so an undo can remove exactly those.

    Existing folders are never built: a dir pool's build would reset their mode.
    """
    missing = []
    path = posixpath.normpath(folder)
    while path != "/":
        with folder_pool(conn, path) as pool:
            if pool is not None:
                break
        missing.append(path)
        path = posixpath.dirname(path)
    if missing:
        with folder_pool(conn, folder, build=True, mode=mode):
            pass
    return missing[::-1]


def remove_folder(conn: libvirt.virConnect, folder: str) -> None:
    """Remove a folder `make_folder` made, if it is empty again (a dir pool's delete is rmdir)."""
    folder = posixpath.normpath(folder)
    with _lock(conn, folder):
        try:
            pool = conn.storagePoolDefineXML(_pool_xml("herdsman-migrate-rm-", folder), 0)
        except libvirt.libvirtError:
            return  # another pool covers it now: it is in use
        try:
            pool.delete(0)
        except libvirt.libvirtError:
            pass  # not empty, or already gone
        finally:
            pool.undefine()


def find(pool: libvirt.virStoragePool | None, name: str) -> libvirt.virStorageVol | None:
    if pool is None:
        return None
    try:
        return pool.storageVolLookupByName(name)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_STORAGE_VOL:
            return None
        raise


def file_facts(conn: libvirt.virConnect, path: str) -> VolumeFacts | None:
    """Facts about a file on the host behind `conn` (None: no such file)."""
    folder, name = posixpath.split(path)
    with folder_pool(conn, folder) as pool:
        vol = find(pool, name)
        return facts(vol) if vol is not None else None


def read_bytes(conn: libvirt.virConnect, vol: libvirt.virStorageVol, length: int) -> bytes:
    stream = conn.newStream(0)
    vol.download(stream, 0, length, 0)
    data = bytearray()
    try:
        while chunk := stream.recv(CHUNK):
            data += chunk
        stream.finish()
    except BaseException:
        stream.abort()
        raise
    return bytes(data)


def copy_stream(src: libvirt.virConnect, svol: libvirt.virStorageVol,
                dst: libvirt.virConnect, dvol: libvirt.virStorageVol, length: int) -> None:
    """Copy `length` bytes from one host's volume to another's, through both libvirtds."""
    down, up = src.newStream(0), dst.newStream(0)
    svol.download(down, 0, length, 0)
    dvol.upload(up, 0, length, 0)
    try:
        copied = 0
        while chunk := down.recv(CHUNK):
            view = memoryview(chunk)
            while view:
                sent = up.send(bytes(view))
                view = view[sent:]
            copied += len(chunk)
        down.finish()
        up.finish()
    except BaseException:
        for stream in (down, up):
            try:
                stream.abort()
            except libvirt.libvirtError:
                pass
        raise
    if copied != length:
        raise PreparationError(f"copied {copied} of {length} bytes of {dvol.path()}")


def volume_xml(name: str, capacity: int, fmt: str, *, mode: str = "0600",
               backing: tuple[str, str] | None = None) -> str:
    """A sparse volume (allocation 0: a raw disk is not written out in full)."""
    vol = etree.Element("volume")
    etree.SubElement(vol, "name").text = name
    etree.SubElement(vol, "capacity", unit="bytes").text = str(capacity)
    etree.SubElement(vol, "allocation", unit="bytes").text = "0"
    target = etree.SubElement(vol, "target")
    etree.SubElement(target, "format", type=fmt)
    perms = etree.SubElement(target, "permissions")
    etree.SubElement(perms, "mode").text = mode
    if backing is not None:
        store = etree.SubElement(vol, "backingStore")
        etree.SubElement(store, "path").text = backing[0]
        etree.SubElement(store, "format", type=backing[1])
    return etree.tostring(vol, encoding="unicode")


def _pool_xml(prefix: str, folder: str, mode: str = "0755") -> str:
    name = prefix + hashlib.sha256(folder.encode()).hexdigest()[:12]
    return (f"<pool type='dir'><name>{name}</name><target><path>{_escape(folder)}</path>"
            f"<permissions><mode>{_escape(mode)}</mode></permissions></target></pool>")


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("'", "&apos;")
