"""The spec → domain pipeline: an ordered list of small configurators over a typed model."""

from __future__ import annotations

from typing import Callable

from drivers.libvirt.domxml import writer
from drivers.libvirt.domxml.configurators import boot, console, cpu, disks, identity, lifecycle, memory, network, seed
from drivers.libvirt.domxml.inputs import RenderInput
from drivers.libvirt.domxml.model import Domain, OsBoot

Configurator = Callable[[RenderInput, Domain], None]

#: Order matters only where a configurator reads what an earlier one wrote (seed after boot
#: and disks: it needs the machine type and the disk letters already taken).
CONFIGURATORS: tuple[Configurator, ...] = (
    identity.configure,
    boot.configure,
    cpu.configure,
    memory.configure,
    disks.configure,
    seed.configure,
    network.configure,
    console.configure_serial,
    console.configure_guest_agent,
    console.configure_graphics,
    lifecycle.configure,
    lifecycle.configure_devices,
    lifecycle.configure_security,
)


def build_domain(inp: RenderInput) -> Domain:
    dom = Domain(type=inp.profile.domain_type, name="", uuid="", os=OsBoot(arch=inp.profile.arch, machine=inp.profile.machine))
    for configure in CONFIGURATORS:
        configure(inp, dom)
    return dom


def render_xml(inp: RenderInput) -> str:
    return writer.to_xml(build_domain(inp))
