"""The folders the agent owns and hands to qemu, made reachable for qemu's user on any host.

A hardened host makes the state dir 0700 (umask 077, ``mktemp -d``, a careful installer).
Under qemu:///system qemu runs as its own user (libvirt-qemu) and must traverse down to the
seed ISOs, the pool's volumes and the kernels; libvirt's DAC driver hands qemu the files, never
the folders above them, so one 0700 folder on the way breaks every VM with qemu's "Permission
denied". At start-up the agent therefore makes the folders it owns traversable (0711: others may
pass through, not list; files inside keep their own modes) and logs each change. A folder above
them that qemu cannot traverse is the operator's: the agent refuses to start with one line that
names it and the fix.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from drivers.base import DriverError
from drivers.libvirt.layout import HostLayout

TRAVERSE = 0o711


class HostDirError(DriverError):
    """A folder qemu must traverse that the agent may not change."""


@dataclass(frozen=True)
class QemuUser:
    uid: int
    gids: frozenset[int]


def qemu_user(uid: int, gid: int) -> QemuUser:
    """qemu's uid with its primary and supplementary groups (from the system's group database)."""
    import pwd

    try:
        name = pwd.getpwuid(uid).pw_name
        gids = frozenset(os.getgrouplist(name, gid))
    except KeyError:
        gids = frozenset({gid})
    return QemuUser(uid, gids)


def can_search(st: os.stat_result, uid: int, gids: Collection[int]) -> bool:
    """POSIX permission check for x on a directory: the owner's bits when `uid` owns it, else
    the group's when one of `gids` is its group, else the others'. (ACLs are not read.)"""
    if uid == 0:
        return True
    mode = st.st_mode
    if st.st_uid == uid:
        return bool(mode & stat.S_IXUSR)
    if st.st_gid in gids:
        return bool(mode & stat.S_IXGRP)
    return bool(mode & stat.S_IXOTH)


def first_blocked(path: Path, uid: int, gids: Collection[int]) -> tuple[Path, os.stat_result] | None:
    """The first folder from / down to `path` that `uid` cannot search; None when every
    existing one is searchable (a missing tail is created by the agent later)."""
    for folder in [*reversed(path.parents), path]:
        try:
            st = folder.stat()
        except FileNotFoundError:
            return None
        if not can_search(st, uid, gids):
            return folder, st
    return None


def owned_dirs(layout: HostLayout) -> list[Path]:
    """The folders qemu passes through on the way to what the agent hands it (the log dir too:
    with qemu.conf's stdio_handler = "file" qemu writes the console logs itself)."""
    state = layout.state_dir
    return [state, state / "seeds", state / "pool", state / "kernels", layout.log_dir]


def make_dir(path: Path, mode: int = TRAVERSE) -> list[Path]:
    """Create `path` and its missing parents with exactly `mode` (the umask does not apply:
    a 077 umask would make them 0700); returns the folders created."""
    created = []
    for folder in [*reversed(path.parents), path]:
        if folder.exists():
            continue
        try:
            folder.mkdir()
        except FileExistsError:  # made meanwhile by someone else: theirs
            continue
        os.chmod(folder, mode)
        created.append(folder)
    return created


def prepare(layout: HostLayout, qemu: QemuUser) -> list[str]:
    """Make the agent's folders exist and let `qemu` traverse them; returns what was changed,
    one line each, for the log. HostDirError when a folder above them blocks qemu."""
    changes = [f"created {folder} ({TRAVERSE:04o})" for target in owned_dirs(layout) for folder in make_dir(target)]
    owned = set(owned_dirs(layout))
    for folder in owned_dirs(layout):
        st = folder.stat()
        if not can_search(st, qemu.uid, qemu.gids):
            mode = stat.S_IMODE(st.st_mode) | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH
            os.chmod(folder, mode)
            changes.append(f"{folder}: {stat.S_IMODE(st.st_mode):04o} → {mode:04o}, so qemu (uid {qemu.uid}) "
                           "can reach the files in it")
    blocked = first_blocked(layout.state_dir, qemu.uid, qemu.gids)
    if blocked is not None and blocked[0] not in owned:
        folder, st = blocked
        raise HostDirError(
            f"qemu (uid {qemu.uid}) cannot traverse {folder} (mode {stat.S_IMODE(st.st_mode):04o}), which holds the "
            f"state dir {layout.state_dir}: every VM would fail with 'Permission denied'. Fix: chmod o+x {folder} "
            "(0711 lets it pass without listing), or choose another --state-dir")
    return changes
