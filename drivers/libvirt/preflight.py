"""`herdsman check`, the libvirt half: what this host's libvirt offers the agent, and what is off.

Each function returns one `HostCheck` (ok / warn / fail, detail, fix). They only read: no pool
is defined, no network started, nothing chmod'ed. KVM is judged by `probe_host_profile`, the
same code that picks the domain type at start-up, so the check and the agent never disagree.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import libvirt
from lxml import etree

from drivers.base import HostCheck
from drivers.libvirt.capabilities import dac_label, probe_host_profile
from drivers.libvirt.host_profile import HostProfile

_PARSER = etree.XMLParser(resolve_entities=False, no_network=True)
KVM_DEVICE = Path("/dev/kvm")


@dataclass(frozen=True)
class QemuIdentity:
    """Who qemu runs as: under qemu:///system libvirt-qemu (Debian), under session the user."""

    uid: int
    gid: int
    label: str


def connect(uri: str) -> tuple[libvirt.virConnect | None, HostCheck]:
    try:
        conn = libvirt.open(uri)
    except libvirt.libvirtError as exc:
        return None, HostCheck("fail", "libvirtd", f"{uri}: {exc.get_error_message() or exc}",
                               "start libvirtd (systemctl start libvirtd; or virtqemud with the modular daemons) "
                               "and check HERDSMAN_LIBVIRT_URI")
    versions = f"libvirt {_version(conn.getLibVersion())}"
    try:
        versions += f", QEMU {_version(conn.getVersion())}"
    except libvirt.libvirtError:
        pass
    return conn, HostCheck("ok", "libvirtd", f"{uri}: {versions}")


def kvm(conn: libvirt.virConnect, requested: Literal["auto", "kvm", "qemu"],
        profile: HostProfile | None = None) -> HostCheck:
    """Whether guests get hardware KVM, as the agent decides at start-up (`profile`: the one
    the agent probed, reused: each probe may cost libvirt seconds)."""
    profile = profile or probe_host_profile(conn, "auto")
    usable, why = profile.kvm_usable, profile.kvm_reason
    fix = ("KVM needs vmx or svm in /proc/cpuinfo and kvm_intel or kvm_amd loaded (in a VM: nested "
           "virtualisation enabled by the outer hypervisor)")
    if requested == "kvm":
        if usable:
            return HostCheck("ok", "kvm", "KVM is usable (HERDSMAN_DOMAIN_TYPE=kvm)")
        return HostCheck("fail", "kvm", f"HERDSMAN_DOMAIN_TYPE=kvm, but {why}", fix + "; or set HERDSMAN_DOMAIN_TYPE=auto")
    if requested == "qemu":
        if usable:
            return HostCheck("warn", "kvm", "KVM is usable, but HERDSMAN_DOMAIN_TYPE=qemu runs guests under TCG "
                                            "(much slower)", "set HERDSMAN_DOMAIN_TYPE=auto")
        return HostCheck("ok", "kvm", f"HERDSMAN_DOMAIN_TYPE=qemu as configured ({why})")
    if usable:
        return HostCheck("ok", "kvm", "KVM is usable: guests run under kvm")
    return HostCheck("warn", "kvm", why, fix + "; or set HERDSMAN_DOMAIN_TYPE=qemu to accept TCG")


def kvm_device(path: Path = KVM_DEVICE) -> HostCheck:
    """/dev/kvm as udev should leave it: group kvm, mode 0660. root:root 0600 makes libvirt think
    qemu cannot use KVM and re-probe qemu on every capabilities lookup (seconds each)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return HostCheck("warn", "kvm-device", f"no {path}: guests can only run under TCG",
                         "load kvm_intel or kvm_amd (modprobe), on a host with hardware virtualisation")
    except OSError as exc:
        return HostCheck("warn", "kvm-device", f"{path}: {exc.strerror}")
    mode, group = stat.S_IMODE(st.st_mode), _group_name(st.st_gid)
    shown = f"{path} is {_owner_name(st.st_uid)}:{group} {mode:04o}"
    if group == "kvm" and mode & 0o060 == 0o060:
        return HostCheck("ok", "kvm-device", shown)
    return HostCheck("warn", "kvm-device", f"{shown}: libvirt re-probes qemu on every capabilities lookup "
                     "(seconds per VM define), and qemu may not open it",
                     f"chgrp kvm {path} && chmod 0660 {path}; make it last with a udev rule: "
                     'KERNEL=="kvm", GROUP="kvm", MODE="0660"')


def qemu_identity(conn: libvirt.virConnect, domain_type: str = "qemu",
                  profile: HostProfile | None = None) -> QemuIdentity:
    """Who qemu runs as, from libvirt's own DAC base label (`+64055:+64055`); the current user
    where there is none (qemu:///session)."""
    if profile is not None and profile.qemu_uid is not None:
        uid, gid = profile.qemu_uid, profile.qemu_gid if profile.qemu_gid is not None else profile.qemu_uid
    else:
        caps = etree.fromstring(conn.getCapabilities().encode(), _PARSER)
        uid, gid = dac_label(caps, domain_type) or (os.getuid(), os.getgid())
    return QemuIdentity(uid, gid, f"{_owner_name(uid)}:{_group_name(gid)}")


def storage_pool(conn: libvirt.virConnect, name: str, expected: Path) -> HostCheck:
    """The pool this agent uses must be the one in its state dir: otherwise images land in one
    folder and libvirt looks for them in another."""
    try:
        pool = conn.storagePoolLookupByName(name)
    except libvirt.libvirtError:
        return HostCheck("ok", "storage-pool", f"pool {name!r} is not defined yet; the agent defines it at "
                                                 f"{expected} on first use")
    root = etree.fromstring(pool.XMLDesc(0).encode(), _PARSER)
    path = Path(root.findtext("target/path") or "")
    if os.path.normpath(path) != os.path.normpath(expected):
        return HostCheck("fail", "storage-pool", f"pool {name!r} is at {path}, but this agent's state dir puts it "
                                                   f"at {expected}",
                         f"point HERDSMAN_STATE_DIR at {path.parent}, use another HERDSMAN_STORAGE_POOL, or "
                         f"virsh pool-destroy {name} && virsh pool-undefine {name} (files stay) and let the "
                         "agent define it again")
    state = "active" if pool.isActive() else "inactive (the agent starts it)"
    return HostCheck("ok", "storage-pool", f"pool {name!r} at {path}, {state}")


def network(conn: libvirt.virConnect, name: str) -> HostCheck:
    """The libvirt network `managed` VMs attach to: defined, active, and back after a reboot."""
    if conn.getURI().rstrip("/").endswith("/session"):
        return HostCheck("ok", "network", "qemu:///session: VMs use user-mode networking")
    try:
        net = conn.networkLookupByName(name)
    except libvirt.libvirtError:
        return HostCheck("fail", "network", f"no libvirt network {name!r}: managed VMs cannot start",
                         f"define it (virsh net-define), or set HERDSMAN_NETWORK to one of: "
                         f"{', '.join(sorted(n.name() for n in conn.listAllNetworks(0))) or 'none defined'}")
    if not net.isActive():
        return HostCheck("fail", "network", f"libvirt network {name!r} is not active: managed VMs cannot start",
                         f"virsh net-start {name} && virsh net-autostart {name}")
    bridge = ""
    try:
        bridge = f" on {net.bridgeName()}"
    except libvirt.libvirtError:
        pass
    if not net.autostart():
        return HostCheck("warn", "network", f"libvirt network {name!r} is active{bridge}, but not started at boot",
                         f"virsh net-autostart {name}")
    return HostCheck("ok", "network", f"libvirt network {name!r} is active{bridge}")


def stdio_handler(conf: Path = Path("/etc/libvirt/qemu.conf")) -> str:
    """qemu.conf's stdio_handler: 'logd' (default: virtlogd, as root, writes console logs) or
    'file' (qemu writes them itself, so it must reach the log dir)."""
    try:
        text = conf.read_text()
    except OSError:
        return "logd"
    match = re.search(r'^\s*stdio_handler\s*=\s*"(\w+)"', text, re.MULTILINE)
    return match.group(1) if match else "logd"


def _version(v: int) -> str:
    return f"{v // 1_000_000}.{v // 1000 % 1000}.{v % 1000}"


def _owner_name(uid: int) -> str:
    import pwd

    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _group_name(gid: int) -> str:
    import grp

    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)
