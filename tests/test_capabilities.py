"""The host probe: kvm only when it really works, the machine behind ``pc``, versions."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest

from drivers.libvirt.capabilities import (
    kvm_usable,
    machine_and_emulator,
    probe_host_profile,
)

VMX_CPUINFO = "processor\t: 0\nflags\t\t: fpu vme de pse tsc msr vmx ssse3\n\nprocessor\t: 1\n" \
              "flags\t\t: fpu vme de pse tsc msr vmx ssse3\n"
SVM_CPUINFO = "processor\t: 0\nflags\t\t: fpu vme svm sse2\n"
NO_VIRT_CPUINFO = "processor\t: 0\nflags\t\t: fpu vme de pse hypervisor sse2\n"


def _system_conn() -> libvirt.virConnect | None:
    if os.geteuid() != 0:
        return None
    try:
        return libvirt.open("qemu:///system")
    except libvirt.libvirtError:
        return None


def _libvirtd_up() -> bool:
    conn = _system_conn()
    if conn is None:
        return False
    conn.close()
    return True


needs_libvirtd = pytest.mark.skipif(not _libvirtd_up(), reason="needs libvirtd (qemu:///system)")


@pytest.fixture
def system_conn() -> Iterator[libvirt.virConnect]:
    conn = _system_conn()
    assert conn is not None
    yield conn
    conn.close()


# -- kvm_usable ---------------------------------------------------------------------------

@pytest.mark.parametrize(("cpuinfo", "flag"), [(VMX_CPUINFO, "vmx"), (SVM_CPUINFO, "svm")])
def test_kvm_is_usable_with_hardware_virtualisation_and_libvirt_support(cpuinfo: str,
                                                                       flag: str) -> None:
    ok, why = kvm_usable(cpuinfo, True, kvm_modules=["kvm", "kvm_intel"])
    assert ok and flag in why


def test_no_vmx_or_svm_means_no_kvm_even_if_libvirt_offers_it() -> None:
    ok, why = kvm_usable(NO_VIRT_CPUINFO, True)
    assert not ok and "vmx or svm" in why


def test_kvm_pvm_module_is_not_hardware_kvm() -> None:
    ok, why = kvm_usable(VMX_CPUINFO, True, kvm_modules=["kvm", "kvm_pvm"])
    assert not ok and "kvm_pvm" in why


def test_libvirt_without_the_kvm_domain_type_means_no_kvm() -> None:
    ok, why = kvm_usable(VMX_CPUINFO, False)
    assert not ok and "'kvm' domain type" in why


def test_every_problem_is_named_at_once() -> None:
    ok, why = kvm_usable(NO_VIRT_CPUINFO, False, kvm_modules=["kvm_pvm"])
    assert not ok
    assert "'kvm' domain type" in why and "kvm_pvm" in why and "vmx or svm" in why


def test_missing_cpu_flags_are_not_taken_as_proof() -> None:
    ok, why = kvm_usable("processor\t: 0\n", True)
    assert not ok and "no CPU flags" in why


def test_cpu_flags_only_matter_on_x86() -> None:
    assert kvm_usable("Features\t: fp asimd\n", True, arch="aarch64")[0]


def test_this_hosts_real_cpuinfo_and_modules() -> None:
    """This machine: /dev/kvm present, but kvm_pvm and no vmx/svm (docs/environment.md)."""
    cpuinfo = Path("/proc/cpuinfo").read_text()
    if re.search(r"^flags\s*:.*\b(vmx|svm)\b", cpuinfo, re.MULTILINE):
        pytest.skip("this host has hardware virtualisation")
    ok, why = kvm_usable(cpuinfo, True)
    assert not ok and "vmx or svm" in why


# -- machine_and_emulator -----------------------------------------------------------------

CAPS_WITH_DOMAIN_OVERRIDE = """<capabilities><host><cpu><arch>x86_64</arch></cpu></host>
<guest><os_type>hvm</os_type><arch name='x86_64'>
  <emulator>/usr/bin/qemu-system-x86_64</emulator>
  <machine canonical='pc-i440fx-7.2' maxCpus='255'>pc</machine>
  <machine canonical='pc-q35-7.2' maxCpus='288'>q35</machine>
  <domain type='qemu'/>
  <domain type='kvm'>
    <emulator>/usr/libexec/qemu-kvm</emulator>
    <machine canonical='pc-i440fx-rhel7.6.0'>pc</machine>
    <machine canonical='pc-q35-rhel9.2.0'>q35</machine>
  </domain>
</arch></guest></capabilities>"""

CAPS_WITHOUT_PC = """<capabilities><guest><os_type>hvm</os_type><arch name='x86_64'>
  <emulator>/usr/bin/qemu-system-x86_64</emulator>
  <machine canonical='pc-q35-8.0'>q35</machine><domain type='qemu'/>
</arch></guest></capabilities>"""


def test_a_domain_type_may_bring_its_own_emulator_and_machines() -> None:
    assert machine_and_emulator(CAPS_WITH_DOMAIN_OVERRIDE, "x86_64", "kvm") == (
        "pc-i440fx-rhel7.6.0", "/usr/libexec/qemu-kvm")
    assert machine_and_emulator(CAPS_WITH_DOMAIN_OVERRIDE, "x86_64", "qemu") == (
        "pc-i440fx-7.2", "/usr/bin/qemu-system-x86_64")


def test_no_pc_alias_leaves_the_machine_to_the_caller() -> None:
    assert machine_and_emulator(CAPS_WITHOUT_PC, "x86_64", "qemu") == (
        None, "/usr/bin/qemu-system-x86_64")
    assert machine_and_emulator(CAPS_WITHOUT_PC, "aarch64", "qemu") == (None, None)


def test_names_that_are_not_arch_names_never_reach_xpath() -> None:
    with pytest.raises(ValueError):
        machine_and_emulator(CAPS_WITHOUT_PC, "x86_64' or '1'='1", "qemu")


# -- probe_host_profile against the real libvirtd -----------------------------------------

@needs_libvirtd
def test_auto_probe_on_this_host_chooses_tcg_and_says_why(system_conn: libvirt.virConnect) -> None:
    profile = probe_host_profile(system_conn, "auto")
    if kvm_usable(Path("/proc/cpuinfo").read_text(), True)[0]:
        pytest.skip("this host has working KVM")
    assert profile.domain_type == "qemu"
    assert len(profile.warnings) == 1
    warning = profile.warnings[0]
    assert "KVM is not usable" in warning and "TCG" in warning
    assert "vmx or svm" in warning
    if os.path.exists("/sys/module/kvm_pvm"):
        assert "kvm_pvm" in warning
    assert re.fullmatch(r"pc-i440fx-\d+\.\d+", profile.machine), profile.machine
    assert profile.emulator is not None and os.access(profile.emulator, os.X_OK)
    assert profile.arch == "x86_64"
    assert profile.session is False
    assert profile.host_cpus == system_conn.getInfo()[2]
    assert profile.host_cpus is not None and profile.host_cpus >= 1
    lib = libvirt.getVersion()
    assert profile.libvirt_version == f"{lib // 1_000_000}.{lib // 1000 % 1000}.{lib % 1000}"
    assert re.fullmatch(r"\d+\.\d+\.\d+", profile.qemu_version)
    assert profile.qemu_version != "0.0.0"


@needs_libvirtd
def test_forcing_kvm_on_a_broken_host_uses_it_but_warns(system_conn: libvirt.virConnect) -> None:
    if kvm_usable(Path("/proc/cpuinfo").read_text(), True)[0]:
        pytest.skip("this host has working KVM")
    profile = probe_host_profile(system_conn, "kvm")
    assert profile.domain_type == "kvm"
    assert any("forced" in w and "unusable" in w for w in profile.warnings)
    assert profile.machine.startswith("pc-i440fx-")


@needs_libvirtd
def test_forcing_qemu_gives_tcg(system_conn: libvirt.virConnect) -> None:
    profile = probe_host_profile(system_conn, "qemu")
    assert profile.domain_type == "qemu"
    assert profile.machine.startswith("pc-i440fx-")
    assert not any("KVM is not usable" in w for w in profile.warnings)


def test_a_driver_without_qemu_says_so_instead_of_pretending() -> None:
    """libvirt's test driver offers only domain type 'test': the profile must warn."""
    conn = libvirt.open("test:///default")
    try:
        profile = probe_host_profile(conn, "qemu")
    finally:
        conn.close()
    assert profile.domain_type == "qemu"
    assert any("no 'qemu' domain type" in w for w in profile.warnings)
    assert profile.host_cpus == 16  # the test driver's fixed node
