"""A typed model of the part of libvirt's domain XML that herdsman writes.

Configurators fill it in; `writer.to_xml` serialises it. Keeping policy out of here (no
defaults that depend on the spec) means a configurator's effect can be asserted on the model
without parsing XML.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from drivers.ports.model import PortBinding


@dataclass
class AgentMetadata:
    """herdsman's own facts about a VM, kept in the domain so a restarted agent can adopt it."""

    instance_uuid: str
    spec_hash: str
    spec: dict = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    userdata_digest: str | None = None
    #: the host ports given to the spec's `ports` (kept so a chosen port survives restarts)
    ports: tuple[PortBinding, ...] = ()
    format_version: int = 1


@dataclass
class OsBoot:
    arch: str
    machine: str
    kernel: str | None = None
    initrd: str | None = None
    cmdline: str | None = None


@dataclass
class Disk:
    target_dev: str
    bus: str
    device: Literal["disk", "cdrom"] = "disk"
    source_type: Literal["volume", "file"] = "volume"
    pool: str | None = None
    volume: str | None = None
    file: str | None = None
    driver_type: str = "qcow2"
    cache: str | None = None
    discard: str | None = None
    readonly: bool = False
    serial: str | None = None
    boot_order: int | None = None
    iotune: dict[str, int] = field(default_factory=dict)


@dataclass
class Interface:
    type: Literal["network", "bridge", "user"]
    mac: str
    source: str | None = None
    model: str = "virtio"


@dataclass
class SerialConsole:
    log_file: str | None = None


@dataclass
class Graphics:
    listen: str
    password: str | None = None


@dataclass
class Domain:
    type: str
    name: str
    uuid: str
    os: OsBoot
    memory_kib: int = 0
    vcpu: int = 1
    title: str | None = None
    description: str | None = None
    metadata: AgentMetadata | None = None
    cpuset: str | None = None
    cpu_shares: int | None = None
    cpu_mode: str | None = None
    hard_limit_kib: int | None = None
    swap_hard_limit_kib: int | None = None  # None: unlimited (libvirt's default)
    features: list[str] = field(default_factory=list)
    tcg_tb_cache_mib: int | None = None
    on_poweroff: str = "destroy"
    on_reboot: str = "restart"
    on_crash: str = "destroy"
    emulator: str | None = None
    disks: list[Disk] = field(default_factory=list)
    scsi_controller: bool = False
    interfaces: list[Interface] = field(default_factory=list)
    serial: SerialConsole | None = None
    guest_agent_channel: bool = False
    graphics: Graphics | None = None
    rng: bool = False
    panic: bool = False
    seclabel_none: bool = False
    qemu_args: list[str] = field(default_factory=list)
