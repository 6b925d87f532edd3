"""What the host offers to the domain builder, probed once at start-up."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

DomainType = Literal["kvm", "qemu"]


@dataclass(frozen=True)
class HostProfile:
    """Facts about the hypervisor that shape a domain but are not part of a VM's spec.

    Kept separate from the spec so that rendering stays a pure function: the same spec and
    profile always give the same XML (golden tests pin a profile).
    """

    domain_type: DomainType = "qemu"
    arch: str = "x86_64"
    machine: str = "pc"
    emulator: str | None = None
    host_cpus: int | None = None
    session: bool = False
    libvirt_version: str = ""
    qemu_version: str = ""
    #: who qemu runs as (libvirt's DAC base label); None where libvirt names nobody (session)
    qemu_uid: int | None = None
    qemu_gid: int | None = None
    #: whether hardware KVM really works here, whatever type was chosen, and why (not)
    kvm_usable: bool = False
    kvm_reason: str = ""
    warnings: tuple[str, ...] = field(default=())
