"""vCPUs, pinning (cpuSet), shares, and the CPU model for the domain type."""

from __future__ import annotations

from drivers.libvirt.domxml.inputs import RenderError, RenderInput
from drivers.libvirt.domxml.model import Domain

__all__ = ["RenderError", "configure"]


def configure(inp: RenderInput, dom: Domain) -> None:
    spec = inp.spec
    dom.vcpu = spec.vcpu
    cpus = spec.cpus
    if cpus is not None:
        host_cpus = inp.profile.host_cpus
        if host_cpus is not None and cpus[-1] >= host_cpus:
            raise RenderError(f"cpuSet: CPU {cpus[-1]} does not exist on this host (it has CPUs 0-{host_cpus - 1})")
        dom.cpuset = spec.cpu_set
    dom.cpu_shares = spec.cpu_shares
    # host-model is migratable and safe; host-passthrough is what breaks on nested/PVM hosts.
    dom.cpu_mode = "host-model" if inp.profile.domain_type == "kvm" else None
