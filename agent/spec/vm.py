"""The virtualMachine resource (../seed/virtualMachine-api.md) as a validated model.

Every field of the resource is here. Fields the controller owns (id, state, counters) are
accepted and ignored; fields that cannot mean anything for a VM are refused with a message
saying so. The README's field table says what each field does on the host.
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid as uuid_module
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, field_validator, model_validator

from agent.spec import fields
from agent.spec.base import (
    Argument,
    Hostname,
    IpAddress,
    LabelKey,
    LabelValue,
    Name,
    Reference,
    SpecModel,
    Text,
)
from agent.spec.errors import PathError
from agent.spec.image import ImageRef, parse_image_ref
from agent.spec.policies import InstanceHealthCheck, LogConfig, RestartPolicy

MIB = 1 << 20
MAX_DISKS = 16
#: Headroom above guest RAM that a `memory` hard limit must leave for qemu itself.
QEMU_OVERHEAD_BYTES = 64 * MIB
#: Namespace for uuids of hand-written specs that have none (`herdsman up`): stable per name.
SPEC_UUID_NAMESPACE = uuid_module.UUID("8f1d9a52-3c1e-4b7a-9a57-6d2b0c4e7f10")

_DISK_NAME_RE = re.compile(r"^[a-z0-9](?:[a-z0-9_.-]{0,18}[a-z0-9])?$")
_SECURITY_OPTS = ("label=disable", "label=dynamic")
DiskFormat = Literal["qcow2", "raw"]


def _security_opt(value: str) -> str:
    if value not in _SECURITY_OPTS:
        raise ValueError(f"{value!r} is not supported; use one of {', '.join(_SECURITY_OPTS)}")
    return value


def _image_uuid(value: str) -> str:
    parse_image_ref(value)
    return value


def _expose(value: str) -> str:
    fields.parse_expose(value)
    return value


ImageUuid = Annotated[str, AfterValidator(_image_uuid)]
ExtraHost = Annotated[str, AfterValidator(lambda v: ":".join(fields.parse_extra_host(v)))]
PortText = Annotated[str, AfterValidator(lambda v: str(fields.parse_port_spec(v)))]
ExposeText = Annotated[str, AfterValidator(_expose)]
SecurityOpt = Annotated[str, AfterValidator(_security_opt)]


def _disk_name(value: str) -> str:
    if not _DISK_NAME_RE.match(value):
        raise ValueError(
            f"{value!r} is not a disk name: 1-20 lower-case letters, digits, '_', '.', '-' "
            "(it becomes the disk's serial number in the guest)"
        )
    return value


def _size(value: str) -> str:
    size = fields.parse_size(value)
    if size < MIB:
        raise ValueError(f"{value!r} is smaller than 1 MiB")
    if size > 64 << 40:
        raise ValueError(f"{value!r} is larger than 64 TiB")
    return value


class DiskOptions(SpecModel):
    """The keys `virtualMachineDisk.opts` may carry; anything else is refused."""

    format: DiskFormat = "qcow2"
    bus: Literal["virtio", "scsi", "sata"] = "virtio"
    cache: Literal["none", "writeback", "writethrough", "directsync", "unsafe"] = "none"
    discard: Literal["unmap", "ignore"] = "unmap"


class VirtualMachineDisk(SpecModel):
    name: Annotated[str, AfterValidator(_disk_name)]
    size: Annotated[str, AfterValidator(_size)] = "40g"
    root: bool = False
    read_iops: int | None = Field(default=None, ge=0, le=1_000_000_000)
    write_iops: int | None = Field(default=None, ge=0, le=1_000_000_000)
    #: storage pool for this disk; defaults to the VM's volumeDriver, then the agent's pool
    driver: Annotated[str, AfterValidator(fields.check_pool_name)] | None = None
    opts: DiskOptions = DiskOptions()

    @field_validator("opts", mode="before")
    @classmethod
    def _opts_from_strings(cls, value: Any) -> Any:
        return {} if value is None else value

    @property
    def size_bytes(self) -> int:
        return fields.parse_size(self.size)


class VirtualMachine(SpecModel):
    # identity and text
    uuid: str | None = None
    name: Name | None = None
    description: Text | None = None
    # compute
    vcpu: int = Field(default=1, ge=1, le=255)
    memory_mb: int = Field(default=512, ge=16, le=4 << 20)
    cpu_set: str | None = None
    cpu_shares: int | None = Field(default=None, ge=2, le=262144)
    memory: int | None = Field(default=None, ge=4 * MIB)
    memory_swap: int | None = Field(default=None, ge=-1)
    # boot and storage
    image_uuid: ImageUuid | None = None
    command: list[Argument] | None = Field(default=None, max_length=256)
    disks: list[VirtualMachineDisk] = Field(default_factory=list, max_length=MAX_DISKS)
    volume_driver: Annotated[str, AfterValidator(fields.check_pool_name)] | None = None
    registry_credential_id: Reference | None = None
    # guest configuration (cloud-init seed)
    userdata: Annotated[str, Field(max_length=1 << 20), AfterValidator(lambda v: fields.check_text(v, single_line=False))] | None = None
    hostname: Hostname | None = None
    domain_name: Hostname | None = None
    dns: list[IpAddress] = Field(default_factory=list, max_length=3)
    dns_search: list[Hostname] = Field(default_factory=list, max_length=6)
    extra_hosts: list[ExtraHost] = Field(default_factory=list, max_length=256)
    # network
    network_mode: Literal["managed", "bridge", "none"] = "managed"
    network_ids: list[Reference] = Field(default_factory=list, max_length=8)
    ports: list[PortText] = Field(default_factory=list, max_length=256)
    expose: list[ExposeText] = Field(default_factory=list, max_length=256)
    # policy
    labels: dict[LabelKey, LabelValue] = Field(default_factory=dict, max_length=512)
    log_config: LogConfig | None = None
    health_check: InstanceHealthCheck | None = None
    restart_policy: RestartPolicy | None = None
    security_opt: list[SecurityOpt] = Field(default_factory=list, max_length=8)
    start_on_create: bool = True
    # accepted, owned by the controller (scheduling, bookkeeping): no effect on the host
    count: int | None = Field(default=None, ge=0)
    requested_host_id: Reference | None = None
    instance_links: dict[str, Any] | None = None
    create_index: int | None = None
    deployment_unit_uuid: str | None = None
    external_id: str | None = None
    first_running: Any = None
    health_state: str | None = None
    host_id: Reference | None = None
    id: Reference | None = None
    native_container: bool | None = None
    primary_ip_address: str | None = None
    start_count: int | None = None
    system_container: str | None = None
    version: str | None = None

    # --- field checks -------------------------------------------------------------------
    @field_validator("uuid")
    @classmethod
    def _uuid(cls, value: str | None) -> str | None:
        return None if value is None else fields.canonical_uuid(value)

    @field_validator("cpu_set")
    @classmethod
    def _cpu_set(cls, value: str | None) -> str | None:
        return None if value is None else fields.format_cpuset(fields.parse_cpuset(value))

    @field_validator("instance_links")
    @classmethod
    def _links(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value:
            raise ValueError("links are a container feature; give a VM the names it needs with extraHosts")
        return value

    # --- cross-field checks -------------------------------------------------------------
    @model_validator(mode="after")
    def _consistency(self) -> "VirtualMachine":
        self._check_memory()
        self._check_disks()
        if self.command:
            if self.image is None or self.image.kind != "kernel":
                raise PathError("command", "command is the kernel command line of a kernel: image; a disk image boots its own")
            for index, arg in enumerate(self.command):
                if not arg or any(c.isspace() or c == '"' for c in arg):
                    raise PathError(f"command.{index}", f"kernel argument {arg!r} is empty or holds white space or quotes")
        return self

    def _check_memory(self) -> None:
        guest = self.memory_mb * MIB
        if self.memory is not None and self.memory < guest + QEMU_OVERHEAD_BYTES:
            raise PathError(
                "memory",
                f"memory ({self.memory} bytes) must be at least memoryMb ({self.memory_mb} MiB) plus "
                f"{QEMU_OVERHEAD_BYTES // MIB} MiB for qemu itself, or the VM is killed",
            )
        if self.memory_swap is not None and self.memory_swap != -1:
            if self.memory is None:
                raise PathError("memorySwap", "memorySwap needs memory (it is memory plus swap, as in docker)")
            if self.memory_swap < self.memory:
                raise PathError("memorySwap", "memorySwap (memory plus swap) must be at least memory, or -1 for unlimited swap")

    def _check_disks(self) -> None:
        seen: set[str] = set()
        for index, disk in enumerate(self.disks):
            if disk.name in seen:
                raise PathError(f"disks.{index}.name", f"disk names must be unique: {disk.name} repeated")
            seen.add(disk.name)
        roots = [index for index, disk in enumerate(self.disks) if disk.root]
        if len(roots) > 1:
            names = ", ".join(self.disks[i].name for i in roots)
            raise PathError(f"disks.{roots[1]}.root", f"only one disk can be root, got {names}")
        if roots and self.image is not None and self.image.kind == "kernel":
            raise PathError(f"disks.{roots[0]}.root", "a kernel: image boots from its kernel and initrd; no disk can be root")
        if roots and self.image is not None and self.disks[roots[0]].opts.format == "raw":
            name = self.disks[roots[0]].name
            raise PathError(
                f"disks.{roots[0]}.opts.format", f"disk {name!r}: a root disk is a qcow2 overlay on the image; it cannot be raw"
            )

    # --- derived views ------------------------------------------------------------------
    @property
    def image(self) -> ImageRef | None:
        return None if self.image_uuid is None else parse_image_ref(self.image_uuid)

    @property
    def instance_uuid(self) -> str:
        """The instance uuid, or a stable one derived from the name for hand-written specs."""
        if self.uuid:
            return self.uuid
        return str(uuid_module.uuid5(SPEC_UUID_NAMESPACE, self.name or "unnamed"))

    @property
    def ordered_disks(self) -> list[VirtualMachineDisk]:
        """Disks in device order, the root disk first (vda, what cloud images expect).

        A disk image with no disk marked root gets one, named 'root' (Rancher's 40g default), so
        `{"imageUuid": ...}` alone is a bootable VM.
        """
        disks = sorted(self.disks, key=lambda d: not d.root)
        image = self.image
        if image is not None and image.kind == "disk" and not any(d.root for d in disks):
            taken = {d.name for d in disks}
            name = next(n for n in ("root", "rootdisk", "boot") if n not in taken)
            disks.insert(0, VirtualMachineDisk(name=name, root=True))
        return disks

    @property
    def cpus(self) -> tuple[int, ...] | None:
        return None if self.cpu_set is None else fields.parse_cpuset(self.cpu_set)

    @property
    def port_specs(self) -> list[fields.PortSpec]:
        return [fields.parse_port_spec(p) for p in self.ports]

    @property
    def extra_host_pairs(self) -> list[tuple[str, str]]:
        return [fields.parse_extra_host(h) for h in self.extra_hosts]

    def spec_hash(self) -> str:
        """Digest of everything that shapes the domain; labels and text are updated in place."""
        live = {"labels", "name", "description"} | _CONTROLLER_FIELDS
        body = self.model_dump(mode="json", by_alias=True, exclude=live)
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


_CONTROLLER_FIELDS = {
    "count", "requested_host_id", "instance_links", "create_index", "deployment_unit_uuid",
    "external_id", "first_running", "health_state", "host_id", "id", "native_container",
    "primary_ip_address", "start_count", "system_container", "version",
}
#: Fields a stored spec (in the domain metadata) leaves out: controller bookkeeping, and
#: userdata, which may hold secrets and lives only in the seed (its digest is in the hash).
STORED_SPEC_EXCLUDE = _CONTROLLER_FIELDS | {"userdata"}
