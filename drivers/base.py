"""The small interface the agent drives a hypervisor through.

The agent never imports libvirt; it speaks in instance uuids, validated specs and these
records. A driver owns everything host-specific: naming, storage, the seed, domain XML.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Protocol

from agent.spec.migration import MigrateInput
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


class GuestAgentError(DriverError):
    """A command through the guest agent failed; the message says what the guest answered."""


class GuestAgentUnavailable(GuestAgentError):
    """No guest agent answers in this VM (not installed, not started, or hung)."""


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
    #: the VM's published ports as docker writes them: 'hostIp:hostPort:guestPort/protocol'
    published_ports: tuple[str, ...] = ()


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


# -- migration --------------------------------------------------------------------------------


@dataclass(frozen=True)
class MigrationProgress:
    """One look at a running (or queued) migration, for progress replies."""

    phase: str  # queued, starting, disks, precopy, postcopy, aborting, ended
    message: str  # one line: "precopy 63 %, 120 MiB left, 35.2 MiB/s, iteration 4"
    percent: int | None = None
    remaining_mib: float | None = None
    rate_mib_s: float | None = None


@dataclass(frozen=True)
class MigrationReport:
    """A migration that succeeded: the VM runs on the destination and is gone from here."""

    instance_uuid: str
    destination_uri: str
    destination_host_uuid: str | None
    seconds: float
    downtime_ms: int | None = None
    memory_mib: float | None = None
    disk_mib: float | None = None
    removed: tuple[str, ...] = ()  # the VM's files deleted here afterwards
    cleanup_error: str | None = None


MigrationProgressCallback = Callable[[MigrationProgress], Any]


# -- streams: what the stream server gets from a driver ------------------------------------------

ConsoleEndReason = Literal["slow", "taken", "gone", "closed"]


@dataclass(frozen=True)
class ConsoleEnded:
    reason: ConsoleEndReason
    message: str


class ConsoleClosed(Exception):
    """A viewer's console ended; ``ended`` says why (``reason``) and for whom (``message``)."""

    def __init__(self, ended: ConsoleEnded) -> None:
        super().__init__(ended.message)
        self.ended = ended


class ConsoleViewer(Protocol):
    """One reader/writer of a VM's serial console, shared with other viewers."""

    ended: ConsoleEnded | None

    async def read(self, max_bytes: int = ..., linger: float = 0.0) -> bytes: ...
    async def write(self, data: bytes) -> None: ...
    def close(self) -> None: ...


GuestStream = Literal["stdout", "stderr"]


class GuestCommand(Protocol):
    """A command running in a guest whose output streams while it runs."""

    argv: list[str]
    stdin: bool
    pty: bool
    exit_code: int | None

    def output(self) -> AsyncIterator[tuple[GuestStream, bytes]]: ...
    async def write(self, data: bytes) -> None: ...
    async def close_stdin(self) -> None: ...
    async def signal(self, name: str) -> None: ...
    async def close(self) -> None: ...


IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class GuestNetwork:
    """Where a VM can be reached: its primary address and its managed network's subnets."""

    primary: str | None
    subnets: tuple[IpNetwork, ...] = ()
    host_addresses: frozenset[IpAddress] = frozenset()  # the host's own addresses on them


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

    # migration (drivers/libvirt/migration/service.py)
    async def migrate_vm(self, instance_uuid: str, request: MigrateInput,
                         progress: MigrationProgressCallback | None = None) -> MigrationReport: ...
    async def cancel_migration(self, instance_uuid: str) -> bool: ...

    # streams
    async def require_vm(self, instance_uuid: str) -> None: ...
    async def guest_network(self, instance_uuid: str, *, subnets: bool = False) -> GuestNetwork: ...
    def console_log_path(self, instance_uuid: str) -> Path | None: ...
    async def attach_console(self, instance_uuid: str) -> ConsoleViewer: ...
    async def open_graphics(self, instance_uuid: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]: ...
    async def guest_exec(self, instance_uuid: str, argv: Sequence[str], *, stdin: bool,
                         tty: bool) -> GuestCommand: ...

    # metrics
    async def domain_stats(self) -> list[VmSample]: ...

# -- what metrics and the host check read ------------------------------------------------------


@dataclass(frozen=True)
class DiskSample:
    """One disk's I/O counters since its VM started (the hypervisor's, not the guest's view)."""

    name: str
    read_bytes: int = 0
    write_bytes: int = 0
    read_ops: int = 0
    write_ops: int = 0


@dataclass(frozen=True)
class NicSample:
    """One NIC's counters since its VM started, seen from the guest: rx is what it received."""

    name: str
    rx_bytes: int = 0
    tx_bytes: int = 0
    rx_packets: int = 0
    tx_packets: int = 0
    rx_errors: int = 0
    tx_errors: int = 0
    rx_drops: int = 0
    tx_drops: int = 0


@dataclass(frozen=True)
class VmSample:
    """Counters of one VM at one moment. None where the hypervisor did not say (a stopped VM
    has no CPU time; libvirt's test driver reports state only)."""

    instance_uuid: str
    state: VmState
    name: str | None = None
    cpu_seconds: float | None = None
    vcpu_seconds: tuple[float, ...] = ()
    vcpus: int | None = None
    memory_bytes: int | None = None
    memory_max_bytes: int | None = None
    memory_rss_bytes: int | None = None
    disks: tuple[DiskSample, ...] = ()
    nics: tuple[NicSample, ...] = ()


CheckStatus = Literal["ok", "warn", "fail"]


@dataclass(frozen=True)
class HostCheck:
    """One line of `herdsman check`: what was checked, what was found, and how to fix it."""

    status: CheckStatus
    name: str
    detail: str
    fix: str | None = None
