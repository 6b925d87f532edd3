"""Kernel modules for the guest: find them in an extracted kernel package, order them by
their dependencies and return their (decompressed) bytes.

The dependency list is read from each module's own `.modinfo` ELF section (`depends=`,
written by the kernel build's modpost). That is the same list `depmod` turns into
`modules.dep`, but reading it needs no kmod tools on the build host and touches only the
handful of modules the guest loads instead of all of them.
"""

from __future__ import annotations

import gzip
import lzma
import shutil
import struct
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

_SUFFIXES = (".ko", ".ko.xz", ".ko.gz", ".ko.zst")


@dataclass(frozen=True)
class Module:
    name: str  # canonical name: dashes become underscores, as the kernel does
    path: Path
    depends: tuple[str, ...]

    def image(self) -> bytes:
        """The plain ELF object, because busybox insmod does not decompress."""
        return read_module_file(self.path)


def canonical(name: str) -> str:
    return name.replace("-", "_")


def read_module_file(path: Path) -> bytes:
    raw = path.read_bytes()
    if path.name.endswith(".xz"):
        return lzma.decompress(raw)
    if path.name.endswith(".gz"):
        return gzip.decompress(raw)
    if path.name.endswith(".zst"):
        if shutil.which("zstd") is None:
            raise RuntimeError(f"{path.name} is zstd-compressed and `zstd` is not installed")
        return subprocess.run(
            ["zstd", "-dc", str(path)], check=True, capture_output=True
        ).stdout
    return raw


def modinfo(elf: bytes) -> dict[str, list[str]]:
    """Key/value pairs of an ELF64 little-endian module's `.modinfo` section."""
    if elf[:4] != b"\x7fELF" or elf[4] != 2 or elf[5] != 1:
        raise ValueError("not a 64-bit little-endian ELF object")
    (shoff,) = struct.unpack_from("<Q", elf, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", elf, 0x3A)

    def section(index: int) -> tuple[int, int, int]:
        name, _type, _flags, _addr, offset, size = struct.unpack_from(
            "<IIQQQQ", elf, shoff + index * shentsize
        )
        return name, offset, size

    _, str_off, str_size = section(shstrndx)
    names = elf[str_off : str_off + str_size]
    for index in range(shnum):
        name_at, offset, size = section(index)
        if names[name_at : names.index(b"\0", name_at)] == b".modinfo":
            info: dict[str, list[str]] = {}
            for item in elf[offset : offset + size].split(b"\0"):
                key, sep, value = item.decode("utf-8", "replace").partition("=")
                if sep:
                    info.setdefault(key, []).append(value)
            return info
    raise ValueError("no .modinfo section")


class ModuleTree:
    """The modules of one kernel, as shipped under lib/modules/<version>/."""

    def __init__(self, moddir: Path) -> None:
        self.moddir = moddir
        self._files: dict[str, Path] = {}
        for path in sorted(moddir.rglob("*.ko*")):
            for suffix in _SUFFIXES:
                if path.name.endswith(suffix):
                    self._files.setdefault(canonical(path.name[: -len(suffix)]), path)
        builtin = moddir / "modules.builtin"
        self.builtin = frozenset(
            canonical(Path(line.strip()).name.removesuffix(".ko"))
            for line in (builtin.read_text().splitlines() if builtin.exists() else [])
            if line.strip()
        )

    def module(self, name: str) -> Module:
        key = canonical(name)
        path = self._files.get(key)
        if path is None:
            raise LookupError(f"kernel module {name!r} not found under {self.moddir}")
        info = modinfo(read_module_file(path))
        depends = tuple(
            canonical(dep) for value in info.get("depends", []) for dep in value.split(",") if dep
        )
        return Module(key, path, depends)

    def load_order(self, wanted: Iterable[str]) -> list[Module]:
        """`wanted` plus everything they depend on, each after its dependencies.

        Modules built into this kernel are skipped, so the same list works for kernels
        that build some of these drivers in.
        """
        order: list[Module] = []
        done: set[str] = set()
        visiting: set[str] = set()

        def visit(name: str) -> None:
            key = canonical(name)
            if key in done or key in self.builtin:
                return
            if key in visiting:
                raise ValueError(f"module dependency cycle through {key}")
            visiting.add(key)
            mod = self.module(key)
            for dep in mod.depends:
                visit(dep)
            visiting.discard(key)
            done.add(key)
            order.append(mod)

        for name in wanted:
            visit(name)
        return order
