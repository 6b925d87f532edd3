"""Domain type, machine, firmware features, and how the VM boots (disk or direct kernel)."""

from __future__ import annotations

from drivers.libvirt.domxml.inputs import KernelBoot, RenderInput
from drivers.libvirt.domxml.model import Domain, OsBoot


def kernel_boot_for(inp: RenderInput) -> KernelBoot | None:
    """The kernel boot of a kernel: image: resolved by the image layer, or its cache paths."""
    image = inp.spec.image
    if image is None or image.kind != "kernel":
        return None
    boot = inp.kernel_boot
    if boot is None:
        folder = inp.layout.kernel_dir(image.url)
        boot = KernelBoot(kernel=str(folder / "kernel"), initrd=str(folder / "initrd"))
    if inp.spec.command:
        # Like a container's command replacing the image's CMD: the user's line replaces the default.
        boot = KernelBoot(kernel=boot.kernel, initrd=boot.initrd, cmdline=" ".join(inp.spec.command))
    return boot


def configure(inp: RenderInput, dom: Domain) -> None:
    profile = inp.profile
    dom.type = profile.domain_type
    dom.emulator = profile.emulator
    dom.os = OsBoot(arch=profile.arch, machine=profile.machine)
    boot = kernel_boot_for(inp)
    if boot is not None:
        dom.os.kernel, dom.os.initrd, dom.os.cmdline = boot.kernel, boot.initrd, boot.cmdline
    # ACPI so that a graceful stop (virDomainShutdown) reaches the guest as a power button.
    dom.features = ["acpi", "apic"]
    if profile.domain_type == "qemu" and inp.policy.tcg_tb_cache_mib:
        dom.tcg_tb_cache_mib = inp.policy.tcg_tb_cache_mib
