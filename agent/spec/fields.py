"""Parsers for the string formats the virtualMachine resource carries.

Each parser is a pure function that returns a normalised value or raises ValueError with a
message a user can act on; the models attach the field path. Keeping them here (not inline in
the models) lets the daemon, the CLI and the tests share one definition of "valid".
"""

from __future__ import annotations

import ipaddress
import re
import unicodedata
import uuid
from dataclasses import dataclass

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtp]?)(i?b?)\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}
_LABEL_RE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")
_LABEL_KEY_RE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._/:-]{0,251}[A-Za-z0-9])?$")
_POOL_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_PROTOCOLS = ("tcp", "udp", "sctp")


def parse_size(text: str) -> int:
    """Docker-style size ("10g", "512m", "1.5GiB", "1048576") → bytes, binary units."""
    match = _SIZE_RE.match(text)
    if not match:
        raise ValueError(f"{text!r} is not a size; use a number with an optional unit k, m, g, t or p (e.g. '10g')")
    number, unit, _ = match.groups()
    value = float(number) * _SIZE_UNITS[unit.lower()]
    if value != int(value):
        raise ValueError(f"{text!r} is not a whole number of bytes")
    return int(value)


def parse_cpuset(text: str) -> tuple[int, ...]:
    """libvirt/cgroup cpuset syntax ("0-3,6", "^2" is not allowed) → sorted CPU numbers."""
    cpus: set[int] = set()
    if not text.strip():
        raise ValueError("cpuSet is empty")
    for part in text.split(","):
        part = part.strip()
        match = re.fullmatch(r"(\d{1,4})(?:-(\d{1,4}))?", part)
        if not match:
            raise ValueError(f"{text!r} is not a CPU list; use numbers and ranges like '0-3,6'")
        first = int(match.group(1))
        last = int(match.group(2)) if match.group(2) is not None else first
        if last < first:
            raise ValueError(f"range {part!r} in cpuSet runs backwards")
        cpus.update(range(first, last + 1))
    return tuple(sorted(cpus))


def format_cpuset(cpus: tuple[int, ...]) -> str:
    """Canonical cpuset text: ranges collapsed, sorted ("0-3,6")."""
    parts: list[str] = []
    start = prev = None
    for cpu in cpus:
        if prev is not None and cpu == prev + 1:
            prev = cpu
            continue
        if start is not None:
            parts.append(str(start) if start == prev else f"{start}-{prev}")
        start = prev = cpu
    if start is not None:
        parts.append(str(start) if start == prev else f"{start}-{prev}")
    return ",".join(parts)


def canonical_uuid(text: str) -> str:
    """The uuid in its canonical lower-case dashed form (libvirt and Cattle compare text)."""
    try:
        return str(uuid.UUID(text))
    except ValueError:
        raise ValueError(f"{text!r} is not a UUID") from None


def check_hostname(text: str) -> str:
    """RFC 1123 host name: dot-separated labels of letters, digits and inner hyphens."""
    name = text[:-1] if text.endswith(".") else text
    if not name or len(name) > 253:
        raise ValueError(f"{text!r} is not a host name (1 to 253 characters)")
    for label in name.split("."):
        if not _LABEL_RE.match(label):
            raise ValueError(
                f"{text!r} is not a valid host name: label {label!r} must be 1-63 letters, digits or "
                "inner hyphens (RFC 1123)"
            )
    return name.lower()


def check_ip(text: str) -> str:
    """An IPv4 or IPv6 address (no prefix), normalised."""
    try:
        return str(ipaddress.ip_address(text.strip()))
    except ValueError:
        raise ValueError(f"{text!r} is not an IP address") from None


def check_label_key(key: str) -> str:
    """Docker/Cattle label keys: reverse-DNS style, e.g. 'io.rancher.vm' or 'team/app'."""
    if not _LABEL_KEY_RE.match(key):
        raise ValueError(
            f"label key {key!r} must be 1-253 characters of letters, digits and . _ / : - "
            "starting and ending with a letter or digit"
        )
    return key


def check_pool_name(name: str) -> str:
    """A libvirt storage pool name we are willing to look up (never a path)."""
    if not _POOL_NAME_RE.match(name):
        raise ValueError(f"{name!r} is not a storage pool name (letters, digits, '_', '.', '-'; at most 64)")
    return name


def check_text(text: str, *, single_line: bool) -> str:
    """Reject text that cannot be stored faithfully: lone surrogates, and for names control characters."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("contains invalid Unicode (a lone surrogate)") from None
    if single_line:
        bad = next((c for c in text if unicodedata.category(c) == "Cc"), None)
        if bad is not None:
            raise ValueError(f"contains the control character U+{ord(bad):04X}; names must be one printable line")
    return text


@dataclass(frozen=True)
class PortSpec:
    """A docker-style port publication: [host_ip:][host_port:]guest_port[/protocol]."""

    guest_port: int
    host_port: int | None = None
    host_ip: str | None = None
    protocol: str = "tcp"

    def __str__(self) -> str:
        """Canonical text that parse_port_spec reads back to an equal PortSpec."""
        guest = f"{self.guest_port}/{self.protocol}"
        host_port = "" if self.host_port is None else str(self.host_port)
        if self.host_ip is None:
            return f"{host_port}:{guest}" if host_port else guest
        address = f"[{self.host_ip}]" if ":" in self.host_ip else self.host_ip
        # "127.0.0.1::80": an address with no host port keeps the empty field.
        return f"{address}:{host_port}:{guest}"


def _port(text: str, what: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise ValueError(f"{what} {text!r} is not a port number (1-65535)")
    return int(text)


def _split_protocol(text: str) -> tuple[str, str]:
    body, _, proto = text.partition("/")
    proto = proto.lower() or "tcp"
    if proto not in _PROTOCOLS:
        raise ValueError(f"protocol {proto!r} in {text!r} must be one of {', '.join(_PROTOCOLS)}")
    return body, proto


def parse_port_spec(text: str) -> PortSpec:
    """'8080:80/tcp', '80', '127.0.0.1:8080:80/udp', '[::1]:8080:80', '127.0.0.1::80'."""
    body, proto = _split_protocol(text.strip())
    host_ip: str | None = None
    if body.startswith("["):
        end = body.find("]")
        if end < 0 or body[end + 1 : end + 2] != ":":
            raise ValueError(f"{text!r}: an IPv6 host address is written as [addr]:hostPort:guestPort")
        host_ip = check_ip(body[1:end])
        body = body[end + 2 :]
        fields = body.split(":")
        if len(fields) != 2:
            raise ValueError(f"{text!r} is not a port spec; use [addr]:hostPort:guestPort")
        host_part, guest_part = fields
    else:
        fields = body.split(":")
        if len(fields) == 1:
            host_part, guest_part = "", fields[0]
        elif len(fields) == 2:
            host_part, guest_part = fields
        elif len(fields) == 3:
            host_ip = check_ip(fields[0])
            host_part, guest_part = fields[1], fields[2]
        else:
            raise ValueError(f"{text!r} is not a port spec; use [hostIp:][hostPort:]guestPort[/protocol]")
    guest = _port(guest_part, "guest port")
    host = _port(host_part, "host port") if host_part else None
    return PortSpec(guest_port=guest, host_port=host, host_ip=host_ip, protocol=proto)


def parse_expose(text: str) -> tuple[int, int, str]:
    """'80', '80/tcp', '8000-8010/udp' → (first, last, protocol)."""
    body, proto = _split_protocol(text.strip())
    first_text, _, last_text = body.partition("-")
    first = _port(first_text, "exposed port")
    last = _port(last_text, "exposed port") if last_text else first
    if last < first:
        raise ValueError(f"range {text!r} runs backwards")
    return first, last, proto


def parse_extra_host(text: str) -> tuple[str, str]:
    """Docker's extraHosts entry 'name:ip' (the ip may be IPv6, so split at the first colon)."""
    name, sep, address = text.partition(":")
    if not sep:
        raise ValueError(f"{text!r} is not 'hostname:ip'")
    return check_hostname(name), check_ip(address)
