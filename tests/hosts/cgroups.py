"""One cgroup per test host, in every mounted hierarchy, under the creating process's cgroup.

Why: two libvirtds on one machine both name a VM's cgroup `machine/qemu-<id>-<name>.libvirt-qemu`;
in the same hierarchy a migrating VM (present on both hosts at once) collides. Each host's
daemons run in a cgroup namespace rooted at its own cgroup, so their `machine/` trees are
disjoint. The cgroup is also the host's kill set: every process started "on" the host joins
it, so tearing a host down (or reaping one a killed test run left behind) is "kill what is in
these cgroups, then remove them", with no pid files to trust.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


@dataclass(frozen=True)
class Hierarchy:
    """A mounted cgroup hierarchy: where it is mounted and how to mount it again."""

    fstype: str  # "cgroup" (v1) or "cgroup2"
    options: str  # the controller options for a v1 mount ("cpu", "name=systemd"), "" for v2
    mountpoint: Path

    def spec(self) -> str:
        """`fstype:options:mountpoint`, the form host-init.sh mounts from."""
        return f"{self.fstype}:{self.options}:{self.mountpoint}"


def hierarchies() -> list[Hierarchy]:
    """The cgroup hierarchies mounted under /sys/fs/cgroup in this mount namespace."""
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        fields, rfields = left.split(), right.split()
        fstype, mountpoint, super_opts = rfields[0], Path(fields[4]), rfields[2]
        if fstype not in ("cgroup", "cgroup2") or CGROUP_ROOT not in mountpoint.parents:
            continue
        options = ""
        if fstype == "cgroup":
            known = {"rw", "ro", "relatime", "noatime", "nosuid", "nodev", "noexec"}
            options = ",".join(o for o in super_opts.split(",") if o not in known)
        found.append(Hierarchy(fstype, options, mountpoint))
    return found


def _own_path(h: Hierarchy) -> str:
    """This process's cgroup in hierarchy `h` (from /proc/self/cgroup)."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if h.fstype == "cgroup2" and controllers == "":
            return path
        if h.fstype == "cgroup" and set(controllers.split(",")) == set(h.options.split(",")):
            return path
    return "/"


def create(name: str) -> list[Path]:
    """Create cgroup `name` under this process's cgroup in every hierarchy; return the dirs.

    cpuset needs its cpus and mems set before a task may join (v1 does not inherit them).
    """
    made = []
    for h in hierarchies():
        path = h.mountpoint / _own_path(h).lstrip("/") / name
        path.mkdir(exist_ok=True)
        if "cpuset" in h.options.split(","):
            for knob in ("cpuset.cpus", "cpuset.mems"):
                (path / knob).write_text((path.parent / knob).read_text())
        made.append(path)
    return made


def _procs(path: Path) -> list[int]:
    """Every pid in cgroup `path` and below."""
    pids: list[int] = []
    for root, _dirs, _files in os.walk(path):
        try:
            pids += [int(p) for p in (Path(root) / "cgroup.procs").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue
    return pids


def kill_all(paths: list[Path], timeout: float = 10.0) -> None:
    """SIGKILL every process in these cgroups (and their children) until none is left."""
    deadline = time.monotonic() + timeout
    while True:
        pids = sorted({pid for path in paths if path.exists() for pid in _procs(path)})
        if not pids:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"processes survive SIGKILL in {paths[0]}: {pids}")
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.05)


def remove(paths: list[Path]) -> None:
    """Remove these (empty) cgroups and everything libvirt made below them, deepest first."""
    for path in paths:
        if not path.exists():
            continue
        for root, dirs, _files in os.walk(path, topdown=False):
            for d in dirs:
                _rmdir(Path(root) / d)
        _rmdir(path)


def _rmdir(path: Path) -> None:
    # a cgroup whose last task just died can be busy for a moment
    for _ in range(50):
        try:
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.02)
    path.rmdir()


def join_command(paths: list[Path], argv: list[str]) -> list[str]:
    """`argv`, run by a shell that first moves itself into these cgroups (then execs).

    Done by the child itself rather than with preexec_fn, which is unsafe in a threaded
    parent (libvirt's event thread, pytest plugins).
    """
    script = 'while [ "$1" != -- ]; do echo $$ >"$1" || exit 125; shift; done; shift; exec "$@"'
    return ["/bin/sh", "-c", script, "join", *(str(p / "cgroup.procs") for p in paths), "--", *argv]
