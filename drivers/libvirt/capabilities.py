"""Probe what the host really offers: domain type (kvm or TCG), machine, emulator, versions.

``/dev/kvm`` existing is not proof that KVM works. On hosts with a software nested hypervisor
(the ``kvm_pvm`` module) or a CPU without ``vmx``/``svm``, libvirt still offers the ``kvm``
domain type, but stock guest kernels hang or die with "KVM internal error". So ``auto`` asks
for both libvirt's word and the CPU's, and falls back to TCG (``<domain type='qemu'>``) with
a warning an operator can see in ``herdsman check``.
"""

from __future__ import annotations

import os
import platform
import re
from collections.abc import Collection
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

import libvirt
from lxml import etree

from drivers.libvirt.host_profile import DomainType, HostProfile

_X86 = {"x86_64", "i686", "i386"}
_PARSER = etree.XMLParser(resolve_entities=False, no_network=True)


def kvm_usable(cpuinfo_text: str, domcaps_kvm_ok: bool, *, kvm_modules: Collection[str] = (),
               arch: str = "x86_64") -> tuple[bool, str]:
    """Whether hardware KVM really works here, and a sentence saying why (not).

    ``cpuinfo_text`` is /proc/cpuinfo, ``domcaps_kvm_ok`` whether libvirt offers the ``kvm``
    domain type, ``kvm_modules`` the loaded kernel modules whose names start with ``kvm``.
    The CPU flag check applies to x86 only (other architectures have no vmx/svm flags).
    """
    problems: list[str] = []
    if not domcaps_kvm_ok:
        problems.append("libvirt offers no 'kvm' domain type on this host (no /dev/kvm, no "
                        "permission on it, or qemu without KVM support)")
    if "kvm_pvm" in kvm_modules:
        problems.append("the kvm module is kvm_pvm, a software nested hypervisor under which "
                        "stock guest kernels hang or fail with 'KVM internal error'")
    which = ""
    if arch in _X86:
        flags: set[str] = set()
        for line in cpuinfo_text.splitlines():
            key, sep, value = line.partition(":")
            if sep and key.strip() == "flags":
                flags.update(value.split())
        which = "vmx" if "vmx" in flags else "svm" if "svm" in flags else ""
        if not flags:
            problems.append("/proc/cpuinfo lists no CPU flags, so hardware virtualisation "
                            "is unproven")
        elif not which:
            problems.append("the CPU has no hardware virtualisation (no vmx or svm in "
                            "/proc/cpuinfo flags)")
    if problems:
        return False, "; ".join(problems)
    if which:
        return True, f"hardware virtualisation ({which}) and libvirt's kvm domain type are present"
    return True, "libvirt offers the kvm domain type"


def machine_and_emulator(caps_xml: str, arch: str, domain_type: str) -> tuple[str | None, str | None]:
    """The canonical machine behind the ``pc`` alias, and the emulator, from capabilities XML.

    ``pc`` (i440fx) is preferred because the seed is an IDE cdrom and small guest kernels have
    no AHCI driver, which ``q35`` needs. A ``<domain type=...>`` element may override its arch's
    machines and emulator. ``None`` where the capabilities have no answer (no ``pc`` alias: the
    caller falls back to the domain capabilities' default machine).
    """
    root = etree.fromstring(caps_xml.encode(), _PARSER)
    arch_el = root.find(f"guest[os_type='hvm']/arch[@name='{_xpath_literal_safe(arch)}']")
    if arch_el is None:
        return None, None
    dom_el = arch_el.find(f"domain[@type='{_xpath_literal_safe(domain_type)}']")
    scopes = [e for e in (dom_el, arch_el) if e is not None]
    emulator = next((e.findtext("emulator") for e in scopes if e.findtext("emulator")), None)
    machines: list[etree._Element] = next(
        (e.findall("machine") for e in scopes if e.findall("machine")), [])
    for m in machines:
        if (m.text or "").strip() == "pc":
            return m.get("canonical") or "pc", emulator
    return None, emulator


def _xpath_literal_safe(value: str) -> str:
    """Arch and domain type names go into an XPath literal: allow only their alphabet."""
    if not value or not all(c.isalnum() or c in "_-." for c in value):
        raise ValueError(f"not an arch or domain type name: {value!r}")
    return value


def _version(v: int) -> str:
    return f"{v // 1_000_000}.{v // 1000 % 1000}.{v % 1000}"


def _local_kvm_modules() -> list[str]:
    names: set[str] = set()
    try:
        names.update(n for n in os.listdir("/sys/module") if n.startswith("kvm"))
    except OSError:
        pass
    try:
        for line in Path("/proc/modules").read_text().splitlines():
            if line.startswith("kvm"):
                names.add(line.split()[0])
    except OSError:
        pass
    return sorted(names)


_DAC_LABEL = re.compile(r"\+?(\d+):\+?(\d+)\Z")


def dac_label(caps: etree._Element, domain_type: str) -> tuple[int, int] | None:
    """(uid, gid) qemu runs as, from the capabilities' DAC base label (`+64055:+64055`)."""
    labels = caps.findall("host/secmodel[model='dac']/baselabel")
    chosen = next((el for el in labels if el.get("type") == domain_type), labels[0] if labels else None)
    match = _DAC_LABEL.match((chosen.text or "").strip()) if chosen is not None else None
    return (int(match.group(1)), int(match.group(2))) if match else None


def _domcaps(conn: libvirt.virConnect, arch: str, virttype: str) -> etree._Element | None:
    try:
        xml = conn.getDomainCapabilities(None, arch, None, virttype, 0)
    except libvirt.libvirtError:
        return None
    return etree.fromstring(xml.encode(), _PARSER)


def probe_host_profile(conn: libvirt.virConnect,
                       requested: Literal["auto", "kvm", "qemu"] = "auto", *,
                       session: bool = False) -> HostProfile:
    """Ask libvirt (and, for a local daemon, the kernel) what guests on this host run on.

    ``requested`` is the operator's choice: ``auto`` picks kvm only when it really works,
    ``kvm``/``qemu`` force a type (with a warning when kvm looks broken). ``session`` is also
    inferred from the URI.
    """
    uri = conn.getURI()
    parts = urlsplit(uri)
    session = session or parts.path.rstrip("/") == "/session"
    caps_xml = conn.getCapabilities()
    caps = etree.fromstring(caps_xml.encode(), _PARSER)
    arch = caps.findtext("host/cpu/arch") or platform.machine()
    arch_el = caps.find(f"guest[os_type='hvm']/arch[@name='{_xpath_literal_safe(arch)}']")
    offered = {d.get("type") for d in arch_el.findall("domain")} if arch_el is not None else set()
    if parts.hostname:  # a remote daemon: its host's files are not ours to read
        features = [f.get("name", "") for f in caps.findall("host/cpu/feature")]
        cpuinfo, modules = "flags\t: " + " ".join(features), []
    else:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
        modules = _local_kvm_modules()
    # Each libvirt capabilities lookup may re-probe qemu (seconds on a host whose /dev/kvm it
    # cannot open): ask for kvm's domain capabilities only when the CPU and modules allow KVM.
    possible, _ = kvm_usable(cpuinfo, True, kvm_modules=modules, arch=arch)
    kvm_caps = _domcaps(conn, arch, "kvm") if "kvm" in offered and possible else None
    ok, why = kvm_usable(cpuinfo, kvm_caps is not None or ("kvm" in offered and not possible),
                         kvm_modules=modules, arch=arch)

    warnings: list[str] = []
    domain_type: DomainType
    if requested == "kvm":
        domain_type = "kvm"
        if not ok:
            warnings.append(f"domain type 'kvm' was forced although KVM looks unusable: {why}")
    elif requested == "qemu" or not ok:
        domain_type = "qemu"
        if requested == "auto":
            warnings.append(f"KVM is not usable: {why}; guests run under TCG software "
                            "emulation (domain type 'qemu'), which is much slower")
        elif ok:
            warnings.append("domain type 'qemu' (TCG) was requested although KVM is usable; "
                            "guests run much slower")
    else:
        domain_type = "kvm"
    if domain_type not in offered:
        warnings.append(f"libvirt offers no '{domain_type}' domain type for {arch} "
                        f"(offered: {', '.join(sorted(t for t in offered if t)) or 'none'})")

    machine, emulator = machine_and_emulator(caps_xml, arch, domain_type)
    if machine is None or emulator is None:
        dom_caps = kvm_caps if domain_type == "kvm" else _domcaps(conn, arch, domain_type)
        if dom_caps is not None:
            machine = machine or dom_caps.findtext("machine")
            emulator = emulator or dom_caps.findtext("path")
    if machine is None:
        machine = "pc"
        warnings.append(f"libvirt names no machine type for {arch}/{domain_type}; using 'pc'")

    qemu = dac_label(caps, domain_type)
    return HostProfile(
        domain_type=domain_type, arch=arch, machine=machine, emulator=emulator,
        kvm_usable=ok, kvm_reason=why,
        qemu_uid=qemu[0] if qemu else None, qemu_gid=qemu[1] if qemu else None,
        host_cpus=conn.getInfo()[2], session=session,
        libvirt_version=_version(conn.getLibVersion()), qemu_version=_version(conn.getVersion()),
        warnings=tuple(warnings),
    )
