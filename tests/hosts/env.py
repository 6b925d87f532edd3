"""A two-host test environment: up, down, reap what a killed run left behind.

Every environment is recorded in /var/lib/herdsman-hosts/<name>/state.json before anything is
created, with the test run that owns it (pid + start time). `up` first tears down environments
whose owner is gone (a test session that was killed), so namespaces, cgroups, processes and
files never pile up. An environment made from the command line has no owner and stays until
`python -m tests.hosts down`.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.hosts import cgroups, daemons, network
from tests.hosts.host import Host
from tests.hosts.network import Lan

REGISTRY = Path("/var/lib/herdsman-hosts")
ROLES = ("a", "b")
MAX_SLOTS = 250


@dataclass
class HostsEnv:
    name: str
    slot: int
    dir: Path
    owner: tuple[int, ...] | None  # (pid, start time in clock ticks, pid namespace) of the owner
    bridge: str = "br0"
    roles: tuple[str, ...] = ROLES
    hosts: dict[str, Host] = field(default_factory=dict)
    cgroups: dict[str, list[Path]] = field(default_factory=dict)  # role or "lan" -> dirs
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def lan(self) -> Lan:
        return Lan(self.slot)

    @property
    def root_address(self) -> str:
        """The root namespace's address on the LAN: bind servers the hosts must reach here."""
        return self.lan.root_address

    @property
    def a(self) -> Host:
        return self.hosts["a"]

    @property
    def b(self) -> Host:
        return self.hosts["b"]

    def set_uplink(self, role: str, up: bool) -> None:
        """Unplug (or plug back) one host's network cable at the LAN switch."""
        network.set_uplink(self.lan, role, up)

    def leases(self) -> dict[str, str]:
        """DHCP leases on the LAN: MAC -> address."""
        path = self.dir / "lan" / "dnsmasq.leases"
        if not path.exists():
            return {}
        return {f[1]: f[2] for f in (line.split() for line in path.read_text().splitlines()) if len(f) >= 3}

    # -- state file -------------------------------------------------------------------------

    def save(self) -> None:
        data: dict[str, Any] = {
            "name": self.name, "slot": self.slot, "dir": str(self.dir),
            "owner": list(self.owner) if self.owner else None, "bridge": self.bridge,
            "roles": list(self.roles), "hosts": {r: h.to_json() for r, h in self.hosts.items()},
            "cgroups": {k: [str(p) for p in v] for k, v in self.cgroups.items()},
            "timings": self.timings,
        }
        tmp = self.dir / "state.json.tmp"
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        tmp.rename(self.dir / "state.json")

    @classmethod
    def load(cls, path: Path) -> HostsEnv:
        data = json.loads((path / "state.json").read_text())
        return cls(
            name=data["name"], slot=data["slot"], dir=Path(data["dir"]),
            owner=tuple(data["owner"]) if data["owner"] else None,  # type: ignore[arg-type]
            bridge=data["bridge"], roles=tuple(data["roles"]),
            hosts={r: Host.from_json(h) for r, h in data["hosts"].items()},
            cgroups={k: [Path(p) for p in v] for k, v in data["cgroups"].items()},
            timings=data.get("timings", {}),
        )

    # -- teardown ---------------------------------------------------------------------------

    def down(self) -> None:
        """Kill every process of the environment, then remove cgroups, namespaces and files."""
        groups = list(self.cgroups.values())
        for paths in groups:
            cgroups.kill_all(paths)
        for paths in groups:
            cgroups.remove(paths)
        network.destroy(self.lan, list(self.roles))
        shutil.rmtree(self.dir, ignore_errors=True)


def up(name: str, *, owner: tuple[int, ...] | None, bridge: str = "br0") -> HostsEnv:
    """Create and start an environment named `name` (an existing one of that name is replaced)."""
    REGISTRY.mkdir(mode=0o755, parents=True, exist_ok=True)
    started = time.monotonic()
    with _locked():
        reap_stale()
        if (REGISTRY / name).exists():
            _down_quietly(REGISTRY / name)
        env = HostsEnv(name=name, slot=_free_slot(), dir=REGISTRY / name, owner=owner, bridge=bridge)
        env.dir.mkdir(mode=0o755)
        env.save()  # recorded before anything exists, so a crash from here on is reapable
        try:
            _start(env, started)
        except BaseException:
            env.down()
            raise
    return env


def _start(env: HostsEnv, started: float) -> None:
    lan = env.lan
    for role in (*env.roles, "lan"):
        env.cgroups[role] = cgroups.create(lan.netns(role))
        env.save()
    network.create(lan, list(env.roles), env.bridge)
    (env.dir / "lan").mkdir(mode=0o755)
    daemons.start_dhcp(lan, env.dir / "lan", env.cgroups["lan"])
    daemons.mountpoints()
    names = {lan.netns(r): lan.host_address(i) for i, r in enumerate(env.roles)}
    names[f"hmh{env.slot}-root"] = lan.root_address
    spawned: list[Host] = []
    for index, role in enumerate(env.roles):
        path = env.dir / role
        address, host_uuid = lan.host_address(index), str(uuid.uuid4())
        daemons.prepare_dir(path, address=address, host_uuid=host_uuid, names=names)
        pid = daemons.spawn_host(lan, role, path, lan.netns(role), env.cgroups[role])
        spawned.append(Host(role=role, hostname=lan.netns(role), address=address, bridge=env.bridge,
                            dir=path, host_uuid=host_uuid, holder_pid=pid,
                            cgroups=tuple(env.cgroups[role])))
    for host in spawned:  # both daemons start at once; wait for each
        env.timings[f"{host.role}_ready_s"] = round(daemons.wait_ready(host) - started, 3)
        env.hosts[host.role] = host
    env.timings["up_s"] = round(time.monotonic() - started, 3)
    env.save()


def down(name: str) -> bool:
    """Tear down the environment `name`; False when there is none."""
    with _locked():
        if not (REGISTRY / name).exists():
            return False
        _down_quietly(REGISTRY / name)
        return True


def environments() -> list[HostsEnv]:
    found = []
    for path in sorted(REGISTRY.glob("*/state.json")):
        with contextlib.suppress(OSError, ValueError, KeyError):
            found.append(HostsEnv.load(path.parent))
    return found


def reap_stale() -> list[str]:
    """Tear down environments whose owning process is gone; returns their names."""
    reaped = []
    for env in environments():
        if env.owner is not None and not owner_alive(env.owner):
            env.down()
            reaped.append(env.name)
    return reaped


def current_owner() -> tuple[int, int, int]:
    return process_identity(os.getpid())


def process_identity(pid: int) -> tuple[int, int, int]:
    """(pid, start time, pid namespace): enough to tell a live owner from a reused pid."""
    return pid, _start_time(pid) or 0, os.stat(f"/proc/{pid}/ns/pid").st_ino


def owner_alive(owner: tuple[int, ...]) -> bool:
    """Whether that process still runs. An owner in another pid namespace cannot be checked
    from here: it counts as alive (its environment is never reaped by mistake)."""
    pid, start, *ns = owner
    if ns and ns[0] != os.stat("/proc/self/ns/pid").st_ino:
        return True
    return _start_time(pid) == start


def _start_time(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def _down_quietly(path: Path) -> None:
    try:
        HostsEnv.load(path).down()
    except (OSError, ValueError, KeyError):
        shutil.rmtree(path, ignore_errors=True)


def _free_slot() -> int:
    taken = {env.slot for env in environments()} | network.root_links_in_use()
    for slot in range(1, MAX_SLOTS + 1):
        if slot not in taken:
            return slot
    raise RuntimeError(f"no free slot for a test environment ({MAX_SLOTS} in use)")


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    """One environment change at a time on this machine (slots, reaping)."""
    with open(REGISTRY / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield
