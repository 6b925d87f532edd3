"""What libvirt does when the guest powers off, reboots or crashes (restartPolicy)."""

from __future__ import annotations

from drivers.libvirt.domxml.inputs import RenderInput
from drivers.libvirt.domxml.model import Domain


def configure(inp: RenderInput, dom: Domain) -> None:
    policy = inp.spec.restart_policy
    dom.on_poweroff = "destroy"  # a guest's own power-off is reported (stop), never undone here
    dom.on_reboot = "restart"
    # A kernel panic (seen through the pvpanic device) restarts the guest in place when the policy
    # asks for restarts; otherwise the domain stops and the agent reports it as died.
    restarts = policy is not None and policy.name in ("always", "on-failure", "unless-stopped")
    dom.on_crash = "restart" if restarts else "destroy"
    dom.panic = True


def configure_devices(inp: RenderInput, dom: Domain) -> None:
    """Devices every cloud guest wants: entropy (cloud-init key generation would stall without it)."""
    dom.rng = True


def configure_security(inp: RenderInput, dom: Domain) -> None:
    dom.seclabel_none = "label=disable" in inp.spec.security_opt
