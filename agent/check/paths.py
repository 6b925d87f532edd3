"""Can qemu's user reach a folder? Every component of the path needs search (x) permission for
it, and one 0700 parent anywhere on the way is enough to break every VM below."""

from __future__ import annotations

import os
import stat
from collections.abc import Collection, Sequence
from pathlib import Path

from drivers.base import CheckStatus, HostCheck
from drivers.libvirt.host_dirs import first_blocked


def traversal_check(name: str, root: Path, subdirs: Sequence[str], *, uid: int, gids: Collection[int], who: str,
                    needed_for: str, severity: CheckStatus = "fail") -> HostCheck:
    """`who` (qemu's user) must reach `root` and its existing `subdirs`; `needed_for` says why."""
    for target in [root, *(root / sub for sub in subdirs)]:
        blocked = first_blocked(target, uid, gids)
        if blocked is not None:
            folder, st = blocked
            bit = "u+x" if st.st_uid == uid else "g+x" if st.st_gid in gids else "o+x"
            return HostCheck(severity, name, f"{folder} is {_describe(st)}: {who} cannot traverse it, so {needed_for}",
                             f"chmod {bit} {folder} (e.g. 0711: traversable, not listable)")
    if not root.exists():
        return HostCheck("ok", name, f"{root} does not exist yet (the agent creates it); {who} can traverse the folders above it")
    found = [sub for sub in subdirs if (root / sub).exists()]
    below = f" and its {', '.join(found)}" if found else ""
    return HostCheck("ok", name, f"{who} can traverse {root} ({_describe(root.stat())}){below}")


def _describe(st: os.stat_result) -> str:
    import grp
    import pwd

    try:
        owner = pwd.getpwuid(st.st_uid).pw_name
    except KeyError:
        owner = str(st.st_uid)
    try:
        group = grp.getgrgid(st.st_gid).gr_name
    except KeyError:
        group = str(st.st_gid)
    return f"{stat.S_IMODE(st.st_mode):04o} {owner}:{group}"
