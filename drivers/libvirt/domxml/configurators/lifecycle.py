"""What libvirt does when the guest powers off, reboots or crashes (restartPolicy)."""

from __future__ import annotations

from drivers.libvirt.domxml.inputs import RenderInput
from drivers.libvirt.domxml.model import Domain


def configure(inp: RenderInput, dom: Domain) -> None:
    """Every stop ends the qemu process, whatever the restartPolicy: the agent applies the policy
    (agent/restarts/), counted and with backoff. libvirt's `<on_crash>restart` would reset a
    panicked guest in place, uncounted, without backoff, and unseen by maximumRetryCount."""
    dom.on_poweroff = "destroy"  # a guest's own power-off is reported (stop); the policy decides
    dom.on_reboot = "restart"  # a guest reboot is not a stop
    # A kernel panic, seen through the pvpanic device, stops the domain as `crashed`.
    dom.on_crash = "destroy"
    dom.panic = True


def configure_devices(inp: RenderInput, dom: Domain) -> None:
    """Devices every cloud guest wants: entropy (cloud-init key generation would stall without it)."""
    dom.rng = True


def configure_security(inp: RenderInput, dom: Domain) -> None:
    dom.seclabel_none = "label=disable" in inp.spec.security_opt
