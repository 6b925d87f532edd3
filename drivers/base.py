"""The small interface the agent drives a hypervisor through.

The agent never imports libvirt; it speaks in instance uuids, validated specs and these
records. A driver owns everything host-specific: naming, storage, the seed, domain XML.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Protocol

from agent.spec.vm import VirtualMachine

VmState = Literal["running", "stopped", "paused", "crashed", "starting", "stopping"]
ExternalStatus = Literal["start", "stop", "die", "destroy"]
#: How a guest stopped, as the restart policy needs it (docker's exit status, for a VM):
#: poweroff - the guest shut itself down in order (exit 0); crashed - qemu crashed or the guest
#: panicked; failed - qemu failed; killed - destroyed by someone other than the agent;
#: lost - found shut off with no known reason (the host rebooted, libvirtd killed it).
StopCause = Literal["poweroff", "crashed", "failed", "killed", "lost"]


class DriverError(RuntimeError):
    """An operation failed; the message is meant for the controller's user."""


class NotFound(DriverError):
    """No VM of ours with that instance uuid on this host."""


class Unavailable(DriverError):
    """The hypervisor cannot be reached right now (the agent keeps trying to reconnect)."""


@dataclass(frozen=True)
class VmRecord:
    """What the agent knows and reports about one VM."""

    instance_uuid: str
    external_id: str
    state: VmState
    labels: dict[str, str] = field(default_factory=dict)
    spec_hash: str = ""
    image: str | None = None
    name: str | None = None
    primary_ip: str | None = None
    #: the running domain uses an older spec; the new one applies at the next cold start
    restart_required: bool = False


@dataclass(frozen=True)
class HostEvent:
    """A change libvirt saw (guest powered off, qemu died, someone used virsh)."""

    instance_uuid: str
    external_id: str
    status: ExternalStatus
    timestamp: float
    #: for a stop or die: how the guest stopped (None: not a stop, or not known)
    cause: StopCause | None = None


@dataclass(frozen=True)
class Placement:
    """Per-VM facts from the controller's event that are not part of the spec."""

    macs: tuple[str, ...] = ()
    image: dict[str, Any] | None = None  # the event's image object: url, checksum, data


class Hypervisor(Protocol):
    async def start(self) -> None: ...
    async def close(self) -> None: ...
    @property
    def available(self) -> bool: ...
    def host_facts(self) -> dict[str, Any]: ...
    def add_event_listener(self, listener: Callable[[HostEvent], None]) -> None: ...
    def add_availability_listener(self, listener: Callable[[bool], None]) -> None: ...

    async def list_vms(self) -> list[VmRecord]: ...
    async def get_vm(self, instance_uuid: str) -> VmRecord: ...
    async def ensure_vm(self, spec: VirtualMachine, placement: Placement, *, start: bool) -> VmRecord: ...
    async def start_vm(self, instance_uuid: str) -> VmRecord: ...
    async def stop_vm(self, instance_uuid: str, timeout: float) -> VmRecord: ...
    async def force_stop_vm(self, instance_uuid: str) -> VmRecord: ...
    async def restart_vm(self, instance_uuid: str, timeout: float) -> VmRecord: ...
    async def remove_vm(self, instance_uuid: str, timeout: float) -> None: ...
    async def purge_vm(self, instance_uuid: str) -> None: ...
    async def inspect_vm(self, instance_uuid: str) -> dict[str, Any]: ...
    async def set_labels(self, instance_uuid: str, labels: dict[str, str]) -> VmRecord: ...
    async def ensure_image(self, reference: str, checksum: str | None,
                           progress: Callable[[int, str], Any] | None = None) -> dict[str, Any]: ...
