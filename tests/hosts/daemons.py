"""Start the processes of a test environment: one libvirtd per host, DHCP on the LAN.

A host's files live in its directory (seen from the root namespace) and are bound over the
real paths inside the host's mount namespace by host-init.sh (see host.PRIVATE). Its
/etc/libvirt starts from the machine's *.conf files only: copying the whole folder would
import the main daemon's persistent domains and pools. Its capabilities cache starts as a
copy of the main daemon's, so the first libvirt call does not probe qemu (seconds).
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import subprocess
import time
from pathlib import Path

import libvirt

from tests.hosts import cgroups
from tests.hosts.host import PRIVATE, Host
from tests.hosts.network import Lan

HERE = Path(__file__).resolve().parent
INIT = HERE / "host-init.sh"
MAIN_CONF = Path("/etc/libvirt")
MAIN_CAPS = Path("/var/cache/libvirt/qemu/capabilities")


def libvirtd_conf(address: str, host_uuid: str) -> str:
    """TCP without auth on the host's LAN address only: a private link, test hosts only."""
    return (
        "# written by tests/hosts: a test host, never a real one\n"
        "listen_tls = 0\n"
        "listen_tcp = 1\n"
        f'listen_addr = "{address}"\n'
        'auth_tcp = "none"\n'
        f'host_uuid = "{host_uuid}"\n'
        'log_outputs = "3:file:/var/log/libvirt/libvirtd.log"\n'
    )


def hosts_file(entries: dict[str, str]) -> str:
    """/etc/hosts for a host: without it every lookup of a host name waits for DNS to time out."""
    lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback"]
    lines += [f"{address}\t{name}" for name, address in entries.items()]
    return "\n".join(lines) + "\n"


def prepare_dir(path: Path, *, address: str, host_uuid: str, names: dict[str, str]) -> None:
    """The host's private files: libvirt's dirs, a fresh config, a warm caps cache, agent dirs."""
    for sub in PRIVATE:
        if sub != "hosts":
            (path / sub).mkdir(parents=True, mode=0o755, exist_ok=True)
    (path / "dev").mkdir(mode=0o755, exist_ok=True)
    for sub in ("lib/images", "lib/dnsmasq", "log/qemu", "cache/qemu/capabilities"):
        (path / sub).mkdir(parents=True, mode=0o755, exist_ok=True)
    qemu_lib = path / "lib" / "qemu"
    qemu_lib.mkdir(mode=0o751, exist_ok=True)
    os.chown(qemu_lib, pwd.getpwnam("libvirt-qemu").pw_uid, grp.getgrnam("libvirt-qemu").gr_gid)
    for conf in MAIN_CONF.glob("*.conf"):
        shutil.copy2(conf, path / "etc" / conf.name)
    if (MAIN_CONF / "nwfilter").is_dir():
        shutil.copytree(MAIN_CONF / "nwfilter", path / "etc" / "nwfilter", dirs_exist_ok=True)
    (path / "etc" / "libvirtd.conf").write_text(libvirtd_conf(address, host_uuid))
    if MAIN_CAPS.is_dir():
        for cached in MAIN_CAPS.glob("*.xml"):
            shutil.copy2(cached, path / "cache" / "qemu" / "capabilities" / cached.name)
    (path / "hosts").write_text(hosts_file(names))


def mountpoints() -> None:
    """The private paths must exist on the machine to be bound over (empty dirs if new)."""
    for sub, target in PRIVATE.items():
        if sub != "hosts":
            Path(target).mkdir(parents=True, exist_ok=True)


def spawn_host(lan: Lan, role: str, path: Path, hostname: str, groups: list[Path]) -> int:
    """Start host-init.sh in the host's namespaces; returns the pid that holds them."""
    env = {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HM_DIR": str(path),
        "HM_HOSTNAME": hostname,
        "HM_BINDS": " ".join(f"{sub}:{target}" for sub, target in PRIVATE.items()),
        "HM_CGROUPS": " ".join(h.spec() for h in cgroups.hierarchies()),
    }
    argv = ["nsenter", f"--net=/run/netns/{lan.netns(role)}", "--",
            "unshare", "--mount", "--uts", "--cgroup", "--propagation", "private", "--",
            "/bin/sh", str(INIT)]
    with open(path / "init.log", "wb") as log:
        proc = subprocess.Popen(cgroups.join_command(groups, argv), env=env, cwd="/",
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    return proc.pid


def wait_ready(host: Host, timeout: float = 60.0) -> float:
    """Wait until the host's libvirtd answers with its capabilities; returns when (monotonic)."""
    socket = host.dir / "run" / "libvirt-sock"
    deadline = time.monotonic() + timeout
    while True:
        if not _alive(host.holder_pid):
            raise RuntimeError(f"host {host.role} failed to start:\n{_tail(host.dir / 'init.log')}")
        if socket.exists():
            try:
                conn = libvirt.open(host.libvirt_uri)
            except libvirt.libvirtError:
                pass
            else:
                try:
                    conn.getCapabilities()  # needs qemu's capabilities: the slow part when cold
                    return time.monotonic()
                finally:
                    conn.close()
        if time.monotonic() > deadline:
            raise RuntimeError(f"host {host.role}: libvirtd did not answer within {timeout:.0f} s\n"
                               f"{_tail(host.dir / 'log' / 'libvirtd.log')}")
        time.sleep(0.02)


def start_dhcp(lan: Lan, path: Path, groups: list[Path]) -> None:
    """dnsmasq on the LAN's switch, DHCP only (no DNS, no default route): guests get addresses."""
    first, last = lan.dhcp_range
    argv = ["nsenter", f"--net=/run/netns/{lan.netns('lan')}", "--",
            "dnsmasq", "--conf-file=/dev/null", "--interface=lan", "--bind-interfaces",
            "--except-interface=lo", "--port=0", f"--dhcp-range={first},{last},255.255.255.0,1h",
            "--dhcp-option=option:router", "--dhcp-option=option:dns-server",
            "--dhcp-authoritative", f"--dhcp-leasefile={path / 'dnsmasq.leases'}",
            f"--pid-file={path / 'dnsmasq.pid'}", f"--log-facility={path / 'dnsmasq.log'}",
            "--user=root", "--group=root"]
    result = subprocess.run(cgroups.join_command(groups, argv), capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"dnsmasq on the test LAN: {result.stderr.strip()}")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[-1][0] != "Z"
    except FileNotFoundError:
        return False


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return f"({path} missing)"
