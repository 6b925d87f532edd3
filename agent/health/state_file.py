"""`<state dir>/health.json`: the daemon's health states, for `herdsman ls` and its own restart.

`herdsman ls` is a process of its own and cannot ask the daemon, so the daemon writes what it
knows to a file: every VM it watches, with its health state (None while it is stopped) and the
start count its reports carry. A restarted daemon reads the start counts back for the VMs it
adopts (libvirt does not keep the controller's start count: it is not part of the spec).

The file is replaced atomically (a temporary file renamed over it, mode 0600 like the state
dir's other files) and rewritten at least every HEARTBEAT seconds, so a reader can tell a live
daemon's file from one a dead daemon left behind: a file older than STALE_AFTER seconds, or
whose writer is gone, says nothing.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

NAME = "health.json"
HEARTBEAT = 30.0
STALE_AFTER = 120.0


@dataclass(frozen=True, slots=True)
class VmHealth:
    health_state: str | None
    start_count: int


def path_in(state_dir: Path) -> Path:
    return state_dir / NAME


def write(path: Path, vms: dict[str, VmHealth], *, now: float | None = None) -> None:
    """Replace the file with these VMs, atomically."""
    body = {
        "pid": os.getpid(),
        "written": time.time() if now is None else now,
        "vms": {uuid: {"healthState": vm.health_state, "startCount": vm.start_count} for uuid, vm in sorted(vms.items())},
    }
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(body, f, separators=(",", ":"))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read(path: Path, *, fresh_only: bool = True, now: float | None = None) -> dict[str, VmHealth]:
    """The VMs in the file; empty when it is missing, unreadable, or (`fresh_only`) stale."""
    try:
        body = json.loads(path.read_text())
        vms: dict[str, Any] = body["vms"]
        written = float(body["written"])
        pid = int(body["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    if fresh_only:
        now = time.time() if now is None else now
        if now - written > STALE_AFTER or not _alive(pid):
            return {}
    found = {}
    for uuid, entry in vms.items() if isinstance(vms, dict) else ():
        if not isinstance(entry, dict):
            continue
        state, count = entry.get("healthState"), entry.get("startCount")
        found[str(uuid)] = VmHealth(state if isinstance(state, str) else None,
                                    count if isinstance(count, int) and not isinstance(count, bool) else 0)
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process: alive
    return True
