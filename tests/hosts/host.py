"""One test host as the tests see it: its addresses, URIs, files and a way to run commands on it."""

from __future__ import annotations

import os
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from tests.hosts.cgroups import join_command

#: Paths each host has privately (a directory of the host bound over it in the host's mount
#: namespace), as `subdirectory of the host dir -> path on the host`. Anything else on the
#: host is the machine's (the test guest's kernel in /var/cache/herdsman is seen by both).
PRIVATE = {
    "run": "/run/libvirt",
    "lib": "/var/lib/libvirt",
    "cache": "/var/cache/libvirt",
    "etc": "/etc/libvirt",
    "log": "/var/log/libvirt",
    "hosts": "/etc/hosts",
    "herdsman": "/var/lib/herdsman",
    "herdsman-log": "/var/log/herdsman",
}


@dataclass(frozen=True)
class Host:
    """A namespaced libvirtd (qemu:///system) with its own address on the environment's LAN."""

    role: str  # "a", "b"
    hostname: str
    address: str  # on the host's bridge
    bridge: str
    dir: Path  # the host's private files, seen from the root namespace
    host_uuid: str  # libvirtd.conf host_uuid (libvirt refuses to migrate between equal ones)
    holder_pid: int  # the process holding the host's namespaces
    cgroups: tuple[Path, ...]

    # -- addresses ------------------------------------------------------------------------

    @property
    def libvirt_uri(self) -> str:
        """The host's libvirtd from the root namespace (its unix socket)."""
        return f"qemu+unix:///system?socket={self.dir / 'run' / 'libvirt-sock'}"

    @property
    def tcp_uri(self) -> str:
        """How another host's libvirtd reaches this one (peer-to-peer migration's dconnuri)."""
        return f"qemu+tcp://{self.address}/system"

    @property
    def migration_address(self) -> str:
        """Where QEMU's migration stream (and NBD for copied disks) connects to."""
        return self.address

    @property
    def migration_uri(self) -> str:
        return f"tcp://{self.address}"

    # -- files ----------------------------------------------------------------------------

    @property
    def agent_state_dir(self) -> PurePosixPath:
        """`herdsman run`'s default state dir, private to this host (qemu can traverse it)."""
        return PurePosixPath("/var/lib/herdsman")

    @property
    def agent_log_dir(self) -> PurePosixPath:
        return PurePosixPath("/var/log/herdsman")

    def path(self, on_host: str | os.PathLike[str]) -> Path:
        """Where a path of this host is, seen from the root namespace."""
        target = PurePosixPath(on_host)
        for sub, private in PRIVATE.items():
            base = PurePosixPath(private)
            if target == base or base in target.parents:
                return self.dir / sub / target.relative_to(base)
        return Path(target)

    # -- processes ------------------------------------------------------------------------

    def command(self, argv: list[str], cwd: str | os.PathLike[str] | None = None) -> list[str]:
        """`argv` run on this host: in its cgroups (so teardown kills it) and namespaces."""
        wd = os.fspath(cwd) if cwd is not None else os.getcwd()
        nsenter = ["nsenter", "-t", str(self.holder_pid), "--net", "--mount", "--uts",
                   "--cgroup", f"--wd={wd}", "--"]
        return join_command(list(self.cgroups), [*nsenter, *argv])

    def popen(self, argv: list[str], *, cwd: str | os.PathLike[str] | None = None,
              **kwargs: Any) -> subprocess.Popen[Any]:
        return subprocess.Popen(self.command(argv, cwd), **kwargs)

    def run(self, argv: list[str], *, cwd: str | os.PathLike[str] | None = None,
            check: bool = True, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        result = subprocess.run(self.command(argv, cwd), **kwargs)
        if check and result.returncode != 0:
            raise RuntimeError(f"on host {self.role}: {' '.join(argv)} exited {result.returncode}: "
                               f"{(result.stderr or '').strip()}")
        return result

    def restart_libvirtd(self) -> None:
        """Stop the host's libvirtd and start it again, as a package upgrade does (its qemu
        processes live on)."""
        self.run(["sh", "-c", "pid=$(cat /run/libvirt/libvirtd.pid); kill $pid; "
                  "while kill -0 $pid 2>/dev/null; do sleep 0.05; done; "
                  "libvirtd -d --listen -p /run/libvirt/libvirtd.pid"])

    # -- state file -----------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["dir"] = str(self.dir)
        data["cgroups"] = [str(p) for p in self.cgroups]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Host:
        return cls(**{**data, "dir": Path(data["dir"]),
                      "cgroups": tuple(Path(p) for p in data["cgroups"])})
