"""A minimal writer for gzip-compressed "newc" cpio archives (the Linux initramfs format).

Written here rather than calling `cpio` so that every entry is owned by root (even when
the builder is not root), device nodes such as /dev/console can be added without
privileges, and the same inputs always give the same bytes (mtime 0, sorted inode numbers).
"""

from __future__ import annotations

import gzip
import stat
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

_MAGIC = b"070701"
_TRAILER = "TRAILER!!!"


@dataclass(frozen=True)
class Entry:
    """One archive member: a directory, regular file, symlink or character device."""

    mode: int  # full st_mode, file type bits included
    data: bytes = b""  # file content, or the target of a symlink
    rdev: tuple[int, int] = (0, 0)  # (major, minor) of a device node


class Archive:
    """Collects entries by absolute guest path; parents are created as 0755 directories."""

    def __init__(self) -> None:
        self._entries: dict[str, Entry] = {}

    @staticmethod
    def _norm(path: str) -> str:
        p = PurePosixPath(path)
        if not p.is_absolute() or ".." in p.parts:
            raise ValueError(f"initramfs path must be absolute and plain: {path!r}")
        return str(p).lstrip("/")

    def _parents(self, name: str) -> None:
        parts = PurePosixPath(name).parts[:-1]
        for i in range(1, len(parts) + 1):
            parent = "/".join(parts[:i])
            existing = self._entries.get(parent)
            if existing is None:
                self._entries[parent] = Entry(stat.S_IFDIR | 0o755)
            elif not stat.S_ISDIR(existing.mode):
                raise ValueError(f"{parent!r} is not a directory")

    def _put(self, path: str, entry: Entry) -> None:
        name = self._norm(path)
        self._parents(name)
        self._entries[name] = entry

    def add_dir(self, path: str, mode: int = 0o755) -> None:
        self._put(path, Entry(stat.S_IFDIR | mode))

    def add_file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        self._put(path, Entry(stat.S_IFREG | mode, data))

    def add_host_file(self, path: str, source: Path, mode: int | None = None) -> None:
        """Copy a host file's content (symlinks followed); keep its permission bits unless given."""
        real = source.resolve(strict=True)
        perm = stat.S_IMODE(real.stat().st_mode) if mode is None else mode
        self.add_file(path, real.read_bytes(), perm)

    def add_symlink(self, path: str, target: str) -> None:
        self._put(path, Entry(stat.S_IFLNK | 0o777, target.encode()))

    def add_char_device(self, path: str, major: int, minor: int, mode: int = 0o600) -> None:
        self._put(path, Entry(stat.S_IFCHR | mode, rdev=(major, minor)))

    def names(self) -> list[str]:
        """Guest paths (without the leading slash) in archive order."""
        return sorted(self._entries)

    def to_cpio(self) -> bytes:
        """The uncompressed newc stream; sorted names put every directory before its content."""
        out = bytearray()
        for ino, name in enumerate(self.names(), start=1):
            entry = self._entries[name]
            nlink = 2 if stat.S_ISDIR(entry.mode) else 1
            out += _member(name, entry, ino, nlink)
        out += _member(_TRAILER, Entry(0), 0, 1)
        return bytes(out)

    def write_gzip(self, target: Path, level: int = 6) -> int:
        """Write the gzip-compressed archive; returns its size in bytes."""
        blob = gzip.compress(self.to_cpio(), compresslevel=level, mtime=0)
        target.write_bytes(blob)
        return len(blob)


def _member(name: str, entry: Entry, ino: int, nlink: int) -> bytes:
    raw_name = name.encode() + b"\0"
    fields = (
        ino, entry.mode, 0, 0, nlink, 0, len(entry.data),
        0, 0, entry.rdev[0], entry.rdev[1], len(raw_name), 0,
    )
    header = _MAGIC + b"".join(b"%08x" % value for value in fields)
    head = header + raw_name
    return head + _pad(len(head)) + entry.data + _pad(len(entry.data))


def _pad(length: int) -> bytes:
    return b"\0" * (-length % 4)
