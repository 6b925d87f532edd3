"""`compute.instance.migrate` input: where the VM goes and, optionally, how (processData).

Cattle 1.6 has no agent event for a migration; herdsman defines this one as an extension
(README, "Live migration"). The destination is named by its libvirtd (`libvirtUri`, reached
peer-to-peer by the source's libvirtd) or by a `host` name or address (then
`qemu+tcp://<host>/system`), with an optional `migrationUri` for QEMU's own stream (default: the
same host) and an optional `hostUuid`: the destination agent's host uuid, checked on the
destination before anything is copied, so a stale address never moves a VM to the wrong host.
Every field is checked here; nothing reaches libvirt or a shell unchecked.
"""

from __future__ import annotations

import ipaddress
import re
from urllib.parse import urlsplit

from pydantic import Field, ValidationError, field_validator, model_validator

from agent.spec.base import SpecModel
from agent.spec.errors import PathError, SpecError
from agent.spec.fields import canonical_uuid

_HOSTNAME = re.compile(r"(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                       r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*")
LIBVIRT_SCHEMES = ("qemu+tcp", "qemu+tls", "qemu+ssh", "qemu+unix", "qemu")
_BAD_CHARS = set("\"'<>\\`$;|&{} \t\r\n")


def check_host(value: str) -> str:
    """An IP address (normalised) or a DNS host name."""
    try:
        return str(ipaddress.ip_address(value.strip("[]")))
    except ValueError:
        pass
    if not _HOSTNAME.fullmatch(value):
        raise ValueError(f"{value!r} is neither an IP address nor a host name")
    return value


def check_libvirt_uri(value: str) -> str:
    if any(c in _BAD_CHARS for c in value.split("?", 1)[0]) or any(c.isspace() or c in "\"'<>\\`" for c in value):
        raise ValueError(f"{value!r} contains characters a libvirt URI cannot have")
    parts = urlsplit(value)
    if parts.scheme not in LIBVIRT_SCHEMES:
        raise ValueError(f"{value!r} is not a qemu libvirt URI (scheme one of {', '.join(LIBVIRT_SCHEMES)})")
    if parts.path != "/system":
        raise ValueError(f"{value!r} does not name qemu's system driver (path /system)")
    if parts.hostname:
        check_host(parts.hostname)
    return value


class MigrationDestination(SpecModel):
    host_uuid: str | None = Field(default=None, max_length=64)
    host: str | None = Field(default=None, max_length=253)
    libvirt_uri: str | None = Field(default=None, max_length=1024)
    migration_uri: str | None = Field(default=None, max_length=300)

    @field_validator("host_uuid")
    @classmethod
    def _uuid(cls, value: str | None) -> str | None:
        return None if value is None else canonical_uuid(value)

    @field_validator("host")
    @classmethod
    def _host(cls, value: str | None) -> str | None:
        return None if value is None else check_host(value)

    @field_validator("libvirt_uri")
    @classmethod
    def _libvirt(cls, value: str | None) -> str | None:
        return None if value is None else check_libvirt_uri(value)

    @field_validator("migration_uri")
    @classmethod
    def _migration(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = urlsplit(value)
        if parts.scheme != "tcp" or not parts.hostname or parts.path or parts.query or parts.fragment:
            raise ValueError(f"{value!r} is not tcp://HOST[:PORT]")
        check_host(parts.hostname)
        try:
            port = parts.port
        except ValueError:
            raise ValueError(f"{value!r} has no valid port") from None
        if port is not None and not 1 <= port <= 65535:
            raise ValueError(f"{value!r} has no valid port")
        return value

    @model_validator(mode="after")
    def _enough(self) -> "MigrationDestination":
        if self.libvirt_uri is None and self.host is None:
            raise PathError("libvirtUri", "missing: give the destination's libvirtUri "
                                          "(qemu+tcp://HOST/system) or its host name or address in host")
        if self.migration_uri is None and self.libvirt_uri is not None and self.host is None \
                and not urlsplit(self.libvirt_uri).hostname:
            raise PathError("migrationUri", "missing: the libvirtUri names no host to send the VM's memory to")
        return self

    @property
    def uri(self) -> str:
        """The destination libvirtd, as the source's libvirtd reaches it (peer-to-peer)."""
        if self.libvirt_uri is not None:
            return self.libvirt_uri
        assert self.host is not None
        return f"qemu+tcp://{_bracket(self.host)}/system"

    @property
    def migration_address(self) -> str:
        if self.migration_uri is not None:
            return check_host(urlsplit(self.migration_uri).hostname or "")
        if self.host is not None:
            return self.host
        return check_host(urlsplit(self.uri).hostname or "")

    @property
    def migration_port(self) -> int | None:
        return urlsplit(self.migration_uri).port if self.migration_uri else None


class MigrationSettings(SpecModel):
    """Per-migration overrides of the agent's --migration-* settings."""

    #: MiB/s, 0 = no limit
    bandwidth: int | None = Field(default=None, ge=0, le=1 << 20)
    #: seconds without a byte moved before the migration is aborted
    progress_timeout: float | None = Field(default=None, gt=0, le=3600)
    #: seconds per GiB of RAM and copied disk before the migration is aborted (or post-copy starts)
    completion_timeout: float | None = Field(default=None, gt=0, le=86400)
    postcopy: bool | None = None
    auto_converge: bool | None = None


class MigrateInput(SpecModel):
    destination: MigrationDestination
    options: MigrationSettings = Field(default_factory=MigrationSettings)


def parse_migrate(process_data: object) -> MigrateInput:
    """processData of compute.instance.migrate; SpecError names each bad field."""
    if not isinstance(process_data, dict) or not process_data:
        raise SpecError.from_validation(_missing(), "processData")
    try:
        return MigrateInput.model_validate(process_data)
    except ValidationError as exc:
        raise SpecError.from_validation(exc, "processData") from None


def _missing() -> ValidationError:
    try:
        MigrateInput.model_validate({})
    except ValidationError as exc:
        return exc
    raise AssertionError("unreachable")


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host
