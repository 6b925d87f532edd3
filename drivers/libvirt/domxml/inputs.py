"""Everything the configurators read: the validated spec, the host profile, the agent's policy."""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass, field

from agent.spec.vm import VirtualMachine, VirtualMachineDisk
from drivers.libvirt.host_profile import HostProfile
from drivers.libvirt.layout import HostLayout


class RenderError(ValueError):
    """The spec is valid but this host cannot honour it; the message names the field."""


@dataclass(frozen=True)
class HostPolicy:
    """Operator choices from the agent's configuration (never from a VM's spec)."""

    layout: HostLayout = field(default_factory=HostLayout)
    network: str = "default"
    bridge: str = "br0"
    vnc_listen: str = "127.0.0.1"
    #: secret the per-VM VNC password is derived from (kept in the state dir)
    vnc_secret: bytes = b""
    #: TCG translation cache; qemu's default (1 GiB on x86) costs a lot of RSS per guest
    tcg_tb_cache_mib: int | None = 64


@dataclass(frozen=True)
class KernelBoot:
    """A resolved direct-kernel-boot image."""

    kernel: str
    initrd: str | None = None
    cmdline: str = "console=ttyS0"


@dataclass(frozen=True)
class RenderInput:
    spec: VirtualMachine
    profile: HostProfile
    policy: HostPolicy = field(default_factory=HostPolicy)
    #: NIC MAC addresses the controller allocated (its `nics`), in device order
    macs: tuple[str, ...] = ()
    #: set once the image layer resolved a kernel: image; None → paths from the layout
    kernel_boot: KernelBoot | None = None

    @property
    def uuid(self) -> str:
        return self.spec.instance_uuid

    @property
    def layout(self) -> HostLayout:
        return self.policy.layout

    def disk_pool(self, disk: VirtualMachineDisk) -> str:
        return disk.driver or self.spec.volume_driver or self.layout.storage_pool

    def vnc_password(self) -> str:
        """Eight characters (VNC's limit), stable for the VM, unguessable without the secret."""
        digest = hmac.new(self.policy.vnc_secret, self.uuid.encode(), hashlib.sha256).hexdigest()
        return digest[:8]


def derived_mac(instance_uuid: str, index: int) -> str:
    """A stable locally administered MAC in qemu's 52:54:00 range, so a redefined VM keeps its lease."""
    digest = hashlib.sha256(f"{instance_uuid}/{index}".encode()).digest()
    return "52:54:00:%02x:%02x:%02x" % (digest[0], digest[1], digest[2])
