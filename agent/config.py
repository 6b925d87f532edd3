"""The agent's configuration: flags, environment variables and an optional config file.

Each setting has one key, used three ways: `--access-key` on the command line,
`CATTLE_ACCESS_KEY` in the environment, and `CATTLE_ACCESS_KEY=...` in the file given by
`--config` (the same KEY=VALUE format as systemd's EnvironmentFile, so
/etc/herdsman/herdsman.env serves both). Precedence: flag > environment > file > default.
"""

from __future__ import annotations

import argparse
import os
import shlex
import uuid as uuid_module
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from drivers.ports.model import PortRange
from drivers.ports.ruleset import DEFAULT_TABLE, TableConfig


@dataclass(frozen=True)
class Setting:
    flag: str
    env: str
    help: str


SETTINGS: dict[str, Setting] = {
    "url": Setting("--url", "CATTLE_URL", "controller API base, e.g. http://127.0.0.1:8080/v1"),
    "access_key": Setting("--access-key", "CATTLE_ACCESS_KEY", "agent API key (HTTP Basic user)"),
    "secret_key": Setting("--secret-key", "CATTLE_SECRET_KEY", "agent API secret (HTTP Basic password)"),
    "health_access_key": Setting("--health-access-key", "HERDSMAN_HEALTH_ACCESS_KEY",
                                 "API key for health reports (POST /serviceevents; default the agent's own)"),
    "health_secret_key": Setting("--health-secret-key", "HERDSMAN_HEALTH_SECRET_KEY", "its secret (default the agent's own)"),
    "libvirt_uri": Setting("--libvirt-uri", "HERDSMAN_LIBVIRT_URI", "default qemu:///system as root, qemu:///session otherwise"),
    "state_dir": Setting("--state-dir", "HERDSMAN_STATE_DIR", "host uuid, secrets, seeds, storage pool (default /var/lib/herdsman)"),
    "log_dir": Setting("--log-dir", "HERDSMAN_LOG_DIR", "serial console logs (default /var/log/herdsman)"),
    "domain_type": Setting("--domain-type", "HERDSMAN_DOMAIN_TYPE", "auto, kvm or qemu (default auto)"),
    "host_uuid": Setting("--host-uuid", "HERDSMAN_HOST_UUID", "default: generated once, kept in the state dir"),
    "log_format": Setting("--log-format", "HERDSMAN_LOG_FORMAT", "auto (default: text to systemd's journal, else json), json or text"),
    "log_level": Setting("--log-level", "HERDSMAN_LOG_LEVEL", "DEBUG, INFO (default), WARNING, ERROR"),
    "concurrency": Setting("--concurrency", "HERDSMAN_CONCURRENCY", "heavy operations at once (default 8)"),
    "network": Setting("--network", "HERDSMAN_NETWORK", "libvirt network for networkMode managed (default 'default')"),
    "bridge": Setting("--bridge", "HERDSMAN_BRIDGE", "host bridge for networkMode bridge (default br0)"),
    "port_range": Setting("--port-range", "HERDSMAN_PORT_RANGE",
                          "host ports the agent chooses from for a `ports` entry without one, e.g. \"80\" (default 20000-29999)"),
    "ports_table": Setting("--ports-table", "HERDSMAN_PORTS_TABLE", "the nftables table (family ip) of published ports (default herdsman)"),
    "storage_pool": Setting("--storage-pool", "HERDSMAN_STORAGE_POOL", "libvirt storage pool for volumes (default herdsman)"),
    "stop_timeout": Setting("--stop-timeout", "HERDSMAN_STOP_TIMEOUT", "seconds a guest gets to power off before it is destroyed (default 10)"),
    "libvirt_timeout": Setting("--libvirt-timeout", "HERDSMAN_LIBVIRT_TIMEOUT",
                               "seconds a libvirt call may take before it fails, connecting included (default 120)"),
    "stream_listen": Setting("--stream-listen", "HERDSMAN_STREAM_LISTEN", "HOST:PORT of the console/exec/logs/proxy stream server (default 0.0.0.0:9345)"),
    "stream_url": Setting("--stream-url", "HERDSMAN_STREAM_URL", "the URL users' clients reach the stream server at (default ws://<this host's address>:<port>)"),
    "stream_cert": Setting("--stream-cert", "HERDSMAN_STREAM_CERT", "PEM certificate (chain) for TLS on the stream server (wss://)"),
    "stream_key": Setting("--stream-key", "HERDSMAN_STREAM_KEY", "PEM private key of --stream-cert (default: in the certificate file)"),
    "metrics_listen": Setting("--metrics-listen", "HERDSMAN_METRICS_LISTEN", "HOST:PORT of the Prometheus /metrics endpoint (default: off)"),
    "migration_max_outgoing": Setting("--migration-max-outgoing", "HERDSMAN_MIGRATION_MAX_OUTGOING",
                                      "live migrations out of this host at once; more wait their turn (default 2)"),
    "migration_bandwidth": Setting("--migration-bandwidth", "HERDSMAN_MIGRATION_BANDWIDTH",
                                   "MiB/s one migration may use, 0 = no limit (default 0)"),
    "migration_progress_timeout": Setting("--migration-progress-timeout", "HERDSMAN_MIGRATION_PROGRESS_TIMEOUT",
                                          "seconds without a byte moved before a migration is aborted (default 30)"),
    "migration_completion_timeout": Setting("--migration-completion-timeout", "HERDSMAN_MIGRATION_COMPLETION_TIMEOUT",
                                            "seconds per GiB of RAM and copied disk a migration may take, at least 120 s in all (default 150)"),
    "migration_postcopy": Setting("--migration-postcopy", "HERDSMAN_MIGRATION_POSTCOPY",
                                  "true: switch a migration that does not converge to post-copy instead of aborting it; needs userfaultfd for qemu (default false)"),
    "controller_public_key": Setting("--controller-public-key", "HERDSMAN_CONTROLLER_PUBLIC_KEY",
                                     "PEM file, or http(s) URL fetched at start-up, of the key the controller signs stream tokens with"),
}


def parse_listen(listen: str) -> tuple[str | None, int]:
    """'0.0.0.0:9345', '[::]:9345', ':9345' (every interface), '127.0.0.1:0' (a free port)."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{listen!r} is not HOST:PORT")
    host = host.strip("[]")
    return (host or None), int(port)


class AgentConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    url: str | None = None
    access_key: str = ""
    secret_key: str = ""
    health_access_key: str | None = None
    health_secret_key: str | None = None
    libvirt_uri: str = Field(default_factory=lambda: "qemu:///system" if os.geteuid() == 0 else "qemu:///session")
    state_dir: Path = Path("/var/lib/herdsman")
    log_dir: Path = Path("/var/log/herdsman")
    domain_type: Literal["auto", "kvm", "qemu"] = "auto"
    host_uuid: str | None = None
    log_format: Literal["auto", "json", "text"] = "auto"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    concurrency: int = Field(default=8, ge=1, le=256)
    network: str = "default"
    bridge: str = "br0"
    port_range: str = "20000-29999"
    ports_table: str = DEFAULT_TABLE
    storage_pool: str = "herdsman"
    stop_timeout: float = Field(default=10.0, ge=0, le=3600)
    libvirt_timeout: float = Field(default=120.0, ge=1, le=86400)
    stream_listen: str = "0.0.0.0:9345"
    stream_url: str | None = None
    stream_cert: Path | None = None
    stream_key: Path | None = None
    controller_public_key: str | None = None
    metrics_listen: str | None = None
    migration_max_outgoing: int = Field(default=2, ge=1, le=64)
    migration_bandwidth: int = Field(default=0, ge=0, le=1 << 20)
    migration_progress_timeout: float = Field(default=30.0, gt=0, le=3600)
    migration_completion_timeout: float = Field(default=150.0, gt=0, le=86400)
    migration_postcopy: bool = False

    @property
    def health_keys(self) -> tuple[str, str]:
        """The key pair health reports are sent with: a real Cattle 1.6 accepts them only from
        a delegate agent key (../shared/docs/healthcheck.md §6), so it can differ."""
        if self.health_access_key is None:
            return self.access_key, self.secret_key
        return self.health_access_key, self.health_secret_key or ""

    @model_validator(mode="after")
    def _health_pair(self) -> "AgentConfig":
        if (self.health_access_key is None) != (self.health_secret_key is None):
            raise ValueError("--health-access-key and --health-secret-key go together: set both or neither")
        if self.health_access_key is not None and ":" in self.health_access_key:
            raise ValueError("--health-access-key must not contain ':' (HTTP Basic auth)")
        return self

    @field_validator("stream_listen", "metrics_listen")
    @classmethod
    def _listen(cls, value: str | None) -> str | None:
        if value is not None:
            parse_listen(value)
        return value

    @field_validator("port_range")
    @classmethod
    def _port_range(cls, value: str) -> str:
        return str(PortRange.parse(value))

    @field_validator("ports_table")
    @classmethod
    def _ports_table(cls, value: str) -> str:
        return TableConfig(name=value).name

    @field_validator("stream_url")
    @classmethod
    def _stream_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not value.startswith(("ws://", "wss://")):
            raise ValueError("must start with ws:// or wss://")
        return value.rstrip("/")

    @field_validator("url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        value = value.rstrip("/")
        if value.endswith("/schemas"):
            value = value[: -len("/schemas")]
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value

    @field_validator("host_uuid")
    @classmethod
    def _host_uuid(cls, value: str | None) -> str | None:
        return None if value is None else str(uuid_module.UUID(value))

    @field_validator("log_level", mode="before")
    @classmethod
    def _level(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines (systemd EnvironmentFile syntax: comments, optional quotes)."""
    values: dict[str, str] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        key, sep, value = line.partition("=")
        if not sep:
            raise ValueError(f"{path}:{number}: expected KEY=VALUE")
        parts = shlex.split(value) if value.strip() else [""]
        values[key.strip()] = " ".join(parts)
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="KEY=VALUE file with any of the settings below")
    for name, setting in SETTINGS.items():
        parser.add_argument(setting.flag, dest=name, default=None, help=f"[{setting.env}] {setting.help}")


class ConfigError(ValueError):
    pass


def load_config(args: argparse.Namespace, environ: Mapping[str, str] = os.environ) -> AgentConfig:
    file_values = read_env_file(args.config) if getattr(args, "config", None) else {}
    raw: dict[str, object] = {}
    for name, setting in SETTINGS.items():
        for source in (file_values.get(setting.env), environ.get(setting.env), getattr(args, name, None)):
            if source not in (None, ""):
                raw[name] = source
    try:
        return AgentConfig.model_validate(raw)
    except ValidationError as exc:
        problems = []
        for error in exc.errors(include_url=False):
            name = str(error["loc"][0]) if error["loc"] else ""
            setting = SETTINGS.get(name)
            label = f"{setting.flag} / {setting.env}" if setting else name
            problems.append(f"{label}: {error['msg']}" if label else error["msg"].removeprefix("Value error, "))
        raise ConfigError("; ".join(problems)) from None


def host_uuid(config: AgentConfig) -> str:
    """The configured host uuid, or the one generated on first start and kept in the state dir."""
    if config.host_uuid:
        return config.host_uuid
    path = config.state_dir / "host-uuid"
    try:
        return str(uuid_module.UUID(path.read_text().strip()))
    except FileNotFoundError:
        pass
    value = str(uuid_module.uuid4())
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(value + "\n")
    os.replace(tmp, path)
    return value


def secret(config: AgentConfig, name: str) -> bytes:
    """A random secret kept in the state dir (mode 0600), created on first use."""
    path = config.state_dir / f"{name}.secret"
    try:
        return path.read_bytes()
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    value = os.urandom(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(value)
    return value
