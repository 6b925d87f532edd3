"""What a migration may do, and where it goes: typed, validated, with the defaults we chose.

Defaults follow what migration.md found: auto-converge on (it throttles only when a guest does
not converge, and converged a hot guest here where downtime steps did not), post-copy off
(QEMU 7.2 under libvirt-qemu has no userfaultfd on Debian 12, and a failed post-copy needs
recovery), a 30 s watchdog on bytes moved (network failures; migrateToURI3 itself does not
return while the link is down), and a completion deadline of 150 s per GiB moved (KubeVirt's
figure; Nova's 800 s/GiB is for much busier guests), never under 120 s.
"""

from __future__ import annotations

import ipaddress
import re
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator

_HOSTNAME = re.compile(r"(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                       r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*")
_LIBVIRT_SCHEMES = ("qemu+tcp", "qemu+tls", "qemu+ssh", "qemu+unix", "qemu")


class MigrationOptions(BaseModel):
    """Policy for one migration (all times in seconds, bandwidths in MiB/s, 0 = unlimited)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    bandwidth: int = Field(0, ge=0, le=1 << 20)
    auto_converge: bool = True
    auto_converge_initial: int | None = Field(None, ge=0, le=100)
    auto_converge_increment: int | None = Field(None, ge=1, le=100)
    postcopy: bool = False
    postcopy_bandwidth: int = Field(0, ge=0, le=1 << 20)
    tls: bool = False
    abort_on_error: bool = True
    progress_timeout: float = Field(30.0, gt=0, le=3600)
    completion_min: float = Field(120.0, gt=0, le=86400)
    completion_per_gib: float = Field(150.0, gt=0, le=86400)
    stall_window: float = Field(40.0, gt=0, le=3600)
    stall_min_improvement: float = Field(0.04, ge=0, lt=1)
    poll_interval: float = Field(0.5, gt=0, le=10)

    def completion_deadline(self, moved_bytes: int) -> float:
        """Seconds a migration of `moved_bytes` (RAM + copied disks) may take in all."""
        return max(self.completion_min, self.completion_per_gib * moved_bytes / (1 << 30))


class Destination(BaseModel):
    """The host a VM goes to: its libvirtd (peer-to-peer) and its migration address."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    libvirt_uri: str = Field(..., max_length=1024)
    migration_address: str = Field(..., max_length=253)
    migration_port: int | None = Field(None, ge=1, le=65535)

    @field_validator("libvirt_uri")
    @classmethod
    def _uri(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in _LIBVIRT_SCHEMES:
            raise ValueError(f"{value!r} is not a qemu libvirt URI (one of {', '.join(_LIBVIRT_SCHEMES)})")
        if parts.path not in ("/system", "/session"):
            raise ValueError(f"{value!r} names no qemu driver path (/system or /session)")
        if any(c.isspace() or c in "\"'<>\\" for c in value):
            raise ValueError(f"{value!r} contains characters a URI cannot have")
        return value

    @field_validator("migration_address")
    @classmethod
    def _address(cls, value: str) -> str:
        try:
            return str(ipaddress.ip_address(value))
        except ValueError:
            pass
        if not _HOSTNAME.fullmatch(value):
            raise ValueError(f"{value!r} is neither an IP address nor a host name")
        return value

    @property
    def migrate_uri(self) -> str:
        """QEMU's migration stream target, always explicit (never the host's default route)."""
        host = self.migration_address
        if ":" in host:
            host = f"[{host}]"
        return f"tcp://{host}" + (f":{self.migration_port}" if self.migration_port else "")
