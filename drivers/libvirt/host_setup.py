"""What the host must offer before the agent creates VMs: folders qemu can reach, the pool here.

Run once, on the first connection. A problem refuses new VMs with its message (VMs already
running are adopted and left alone either way); a folder qemu cannot reach and the agent may not
change is fatal at start-up: the agent refuses to start with that one line.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import libvirt

from drivers.libvirt import host_dirs, storage, threads
from drivers.libvirt.host_profile import HostProfile
from drivers.libvirt.layout import HostLayout


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
