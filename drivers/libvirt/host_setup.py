"""What the host must offer before the agent creates VMs: a usable /dev/kvm node, folders qemu
can reach, the pool at this state dir.

Run once, on the first connection. A problem refuses new VMs with its message (VMs already
running are adopted and left alone either way); a folder qemu cannot reach and the agent may not
change is fatal at start-up: the agent refuses to start with that one line.
"""

from __future__ import annotations

import asyncio
import grp
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import libvirt

from drivers.libvirt import host_dirs, storage, threads
from drivers.libvirt.host_profile import HostProfile
from drivers.libvirt.layout import HostLayout

KVM_DEVICE = Path("/dev/kvm")


@dataclass(frozen=True)
class SetupProblem:
    message: str
    fatal: bool  # the agent should not start at all


async def prepare(uri: str, layout: HostLayout, profile: HostProfile, conn: libvirt.virConnect,
                  pool_path: Path, log: logging.Logger) -> SetupProblem | None:
    """Make the state dir reachable for qemu (host_dirs) and the pool point at this state dir
    (storage.reconcile_pool); log what was changed; return what stands in the way, if anything."""
    parts = urlsplit(uri)
    if parts.hostname or parts.scheme.startswith("test"):
        return None  # a remote host's folders are not ours to look at; the test driver has none
    if profile.qemu_uid is not None and not profile.session:
        qemu = host_dirs.qemu_user(profile.qemu_uid, profile.qemu_gid or profile.qemu_uid)
        try:
            for change in await asyncio.to_thread(host_dirs.prepare, layout, qemu):
                log.info("state dir prepared for qemu: %s", change)
        except host_dirs.HostDirError as exc:
            log.error(str(exc))
            return SetupProblem(str(exc), fatal=True)
    try:
        moved = await threads.call(storage.reconcile_pool, conn, layout.storage_pool, pool_path)
    except storage.PoolElsewhere as exc:
        log.error(str(exc))
        return SetupProblem(str(exc), fatal=False)
    if moved:
        log.warning(moved)
    return None


def local_system(uri: str) -> bool:
    parts = urlsplit(uri)
    return not parts.hostname and parts.scheme.startswith("qemu") and parts.path.rstrip("/") == "/system"


def prepare_kvm_device(uri: str, log: logging.Logger, device: Path = KVM_DEVICE) -> str | None:
    """Give /dev/kvm the group and mode udev gives it (root:kvm 0660) when it lacks them.

    Without udev (containers, minimal hosts) the node may be root:root 0600. libvirt then finds
    that the qemu it probed with KVM can no longer use KVM, drops its capabilities cache on
    every lookup and probes qemu again: seconds per lookup, and defining one VM makes ~18 of
    them (measured: 80 s per VM). Runs before the agent's own first lookup; returns what it did.
    """
    if not local_system(uri):
        return None
    try:
        st = device.stat()
        kvm_gid = grp.getgrnam("kvm").gr_gid
    except (FileNotFoundError, KeyError):
        return None  # no KVM here, or no kvm group to give it to
    mode = stat.S_IMODE(st.st_mode)
    if not stat.S_ISCHR(st.st_mode) or (st.st_gid == kvm_gid and mode & 0o060 == 0o060):
        return None
    try:
        os.chown(device, -1, kvm_gid)
        os.chmod(device, mode | 0o060)
    except OSError as exc:
        log.warning("%s is %04o and not group kvm: libvirt will probe qemu again on every capabilities "
                    "lookup (seconds per VM); could not fix it: %s. Fix: a udev rule KERNEL==\"kvm\", "
                    "GROUP=\"kvm\", MODE=\"0660\"", device, mode, exc)
        return None
    done = f"{device} was {mode:04o} gid {st.st_gid}; made it group kvm {mode | 0o060:04o}, as udev does"
    log.warning("%s (otherwise libvirt probes qemu again on every capabilities lookup: ~4 s each, "
                "about 80 s per VM define)", done)
    return done
