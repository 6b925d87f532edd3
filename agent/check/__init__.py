"""`herdsman check`: a host preflight, one line per check with what to do about it.

    ok    libvirtd      qemu:///system: libvirt 9.0.0, QEMU 7.2.0
    fail  state-dir     /var/lib/herdsman is 0700 root:root: libvirt-qemu:libvirt-qemu cannot ...  fix: chmod o+x ...

Every check only reads. The same checks run in the background when `herdsman run` starts
(`startup.log_host_checks`), so the journal says what is wrong with a host before a VM fails.
"""

from __future__ import annotations

import os
import pwd
from collections.abc import Iterable

import libvirt

from agent.check.controller import probe
from agent.check.host import clock, clock_skew, disk_space, kernel_clock_synchronised
from agent.check.paths import traversal_check
from agent.config import AgentConfig
from drivers.base import HostCheck
from drivers.libvirt import preflight
from drivers.libvirt.host_profile import HostProfile

__all__ = ["exit_code", "format_lines", "run_checks"]

#: where the agent keeps what qemu opens (HostLayout, Provisioner.pool_path)
STATE_SUBDIRS = ("pool", "seeds", "kernels")


def run_checks(config: AgentConfig, profile: HostProfile | None = None) -> list[HostCheck]:
    """Every check, in the order an operator fixes them. Blocking (libvirt, HTTP): run it in a
    process or thread of its own, never on the agent's event loop. `profile`: the host profile
    the agent already probed (each probe may cost libvirt seconds), or None to probe."""
    checks: list[HostCheck] = []
    conn, reached = preflight.connect(config.libvirt_uri)
    checks.append(reached)
    if conn is None:
        checks += [HostCheck("warn", name, "not checked: libvirtd is unreachable")
                   for name in ("kvm", "state-dir", "log-dir", "storage-pool", "network")]
    else:
        try:
            checks += libvirt_checks(conn, config, profile)
        finally:
            conn.close()
    checks.append(disk_space(config.state_dir))
    answer = probe(config.url, config.access_key, config.secret_key)
    checks.append(answer.check)
    skew = clock_skew(answer.date, answer.sent, answer.received) if answer.date else None
    checks.append(clock(kernel_clock_synchronised(), skew))
    return checks


def libvirt_checks(conn: libvirt.virConnect, config: AgentConfig,
                   profile: HostProfile | None = None) -> list[HostCheck]:
    checks = []
    uri = conn.getURI()
    if uri.startswith("qemu"):  # the test driver runs no guests: no KVM to judge
        checks.append(preflight.kvm(conn, config.domain_type, profile))
        if uri.startswith("qemu:"):  # a local daemon: this host's /dev/kvm
            checks.append(preflight.kvm_device())
    qemu = preflight.qemu_identity(conn, profile=profile)
    try:
        gids = os.getgrouplist(pwd.getpwuid(qemu.uid).pw_name, qemu.gid)
    except KeyError:  # a uid without a passwd entry: its primary group only
        gids = [qemu.gid]
    who = qemu.label
    checks.append(traversal_check(
        "state-dir", config.state_dir, STATE_SUBDIRS, uid=qemu.uid, gids=gids, who=who,
        needed_for="qemu cannot open the VMs' disks, seeds and kernels below it"))
    handler = preflight.stdio_handler()
    checks.append(traversal_check(
        "log-dir", config.log_dir, ("console",), uid=qemu.uid, gids=gids, who=who,
        severity="fail" if handler == "file" else "warn",
        needed_for=("qemu cannot write the console logs (qemu.conf: stdio_handler = \"file\")" if handler == "file"
                    else "qemu could not write console logs with qemu.conf's stdio_handler = \"file\" "
                         "(now \"logd\": virtlogd writes them as root, so VMs run)")))
    checks.append(preflight.storage_pool(conn, config.storage_pool, config.state_dir / "pool"))
    checks.append(preflight.network(conn, config.network))
    return checks


def format_lines(checks: Iterable[HostCheck]) -> list[str]:
    """`status  name  detail  fix: ...`, the names padded to one column."""
    checks = list(checks)
    width = max((len(c.name) for c in checks), default=0)
    return [f"{c.status:<4}  {c.name:<{width}}  {c.detail}" + (f"  fix: {c.fix}" if c.fix else "") for c in checks]


def exit_code(checks: Iterable[HostCheck]) -> int:
    return 1 if any(c.status == "fail" for c in checks) else 0
