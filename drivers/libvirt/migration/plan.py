"""The migrateToURI3 call for one migration: flags and typed parameters (a pure function).

Always peer-to-peer live migration that persists the domain on the destination and undefines
it on the source (`LIVE|PEER2PEER|PERSIST_DEST|UNDEFINE_SOURCE`): the domain's definition,
and with it herdsman's metadata, travels with it, and it is never defined on two hosts.
`NON_SHARED_INC` copies the writable local disks (the destination overlays are created first,
on the same backing images), listed explicitly in `migrate_disks`: with an empty list libvirt
would copy every writable disk, shared ones included. The migration URI is always explicit,
so QEMU's stream goes over the chosen link, not wherever the destination's name resolves.
Never TUNNELLED (no disk copy, extra copies of memory) nor UNSAFE.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import libvirt

from drivers.libvirt.migration.disks import DiskInfo, copied_disks
from drivers.libvirt.migration.options import Destination, MigrationOptions

BASE_FLAGS = (libvirt.VIR_MIGRATE_LIVE | libvirt.VIR_MIGRATE_PEER2PEER
              | libvirt.VIR_MIGRATE_PERSIST_DEST | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE)
NEVER = libvirt.VIR_MIGRATE_TUNNELLED | libvirt.VIR_MIGRATE_UNSAFE | libvirt.VIR_MIGRATE_NON_SHARED_DISK


@dataclass(frozen=True)
class MigrationCall:
    """Arguments of `virDomainMigrateToURI3(dconnuri, params, flags)`."""

    dconnuri: str
    flags: int
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def migrate_disks(self) -> tuple[str, ...]:
        return tuple(self.params.get(libvirt.VIR_MIGRATE_PARAM_MIGRATE_DISKS, ()))

    @property
    def postcopy(self) -> bool:
        return bool(self.flags & libvirt.VIR_MIGRATE_POSTCOPY)


def build_call(options: MigrationOptions, disks: list[DiskInfo], dest: Destination) -> MigrationCall:
    flags = BASE_FLAGS
    params: dict[str, Any] = {libvirt.VIR_MIGRATE_PARAM_URI: dest.migrate_uri}
    copied = [d.target for d in copied_disks(disks)]
    if copied:
        flags |= libvirt.VIR_MIGRATE_NON_SHARED_INC
        params[libvirt.VIR_MIGRATE_PARAM_MIGRATE_DISKS] = copied
    if options.auto_converge:
        flags |= libvirt.VIR_MIGRATE_AUTO_CONVERGE
        if options.auto_converge_initial is not None:
            params[libvirt.VIR_MIGRATE_PARAM_AUTO_CONVERGE_INITIAL] = options.auto_converge_initial
        if options.auto_converge_increment is not None:
            params[libvirt.VIR_MIGRATE_PARAM_AUTO_CONVERGE_INCREMENT] = options.auto_converge_increment
    if options.postcopy:
        flags |= libvirt.VIR_MIGRATE_POSTCOPY
        if options.postcopy_bandwidth:
            params[libvirt.VIR_MIGRATE_PARAM_BANDWIDTH_POSTCOPY] = options.postcopy_bandwidth
    if options.bandwidth:
        params[libvirt.VIR_MIGRATE_PARAM_BANDWIDTH] = options.bandwidth
    if options.tls:
        flags |= libvirt.VIR_MIGRATE_TLS
    if options.abort_on_error:
        flags |= libvirt.VIR_MIGRATE_ABORT_ON_ERROR
    assert not flags & NEVER
    assert bool(flags & libvirt.VIR_MIGRATE_NON_SHARED_INC) == bool(copied), "INC needs migrate_disks"
    return MigrationCall(dconnuri=dest.libvirt_uri, flags=flags, params=params)


def describe_flags(flags: int) -> str:
    """`LIVE|PEER2PEER|...` for logs and error messages."""
    names = [name[len("VIR_MIGRATE_"):] for name in dir(libvirt)
             if name.startswith("VIR_MIGRATE_") and not name.startswith("VIR_MIGRATE_PARAM")
             and isinstance(getattr(libvirt, name), int)]
    values = sorted({getattr(libvirt, f"VIR_MIGRATE_{n}"): n for n in names}.items())
    return "|".join(n for v, n in values if v and flags & v == v and v & (v - 1) == 0)
