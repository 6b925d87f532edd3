"""Host facts for the Cattle ping reply (the host resource's ``info`` and capacity).

Cattle pings every 5 s, so everything here is cheap: facts that never change while the agent
runs (CPU model, OS release, kernel) are read once; the rest comes from /proc through psutil,
and CPU usage is the delta since the previous call, never a blocking sample.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import os
import platform
import shlex
import socket
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psutil

log = logging.getLogger(__name__)

MIB = 1024 * 1024
_ROUTE_FILE = Path("/proc/net/route")
_RTF_UP = 0x1


def host_info(
    *, libvirt_version: str, qemu_version: str, domain_type: str, disk_paths: Sequence[str]
) -> dict[str, Any]:
    """Cattle's ``info`` layout: cpuInfo, memoryInfo, diskInfo, osInfo, hypervisorInfo."""
    return {
        "cpuInfo": _cpu_info(),
        "memoryInfo": _memory_info(),
        "diskInfo": {"mountPoints": _mount_points(disk_paths)},
        "osInfo": _os_info(),
        "hypervisorInfo": {
            "libvirtVersion": libvirt_version,
            "qemuVersion": qemu_version,
            "domainType": domain_type,
        },
    }


def host_capacity(disk_path: str) -> dict[str, int]:
    """What Cattle schedules against; it records these once, when the host first appears.
    Raises OSError when ``disk_path`` does not exist: a wrong pool path must not register
    a host with no storage."""
    return {
        "memory": psutil.virtual_memory().total,
        "milliCpu": (os.cpu_count() or 1) * 1000,
        "localStorageMb": psutil.disk_usage(disk_path).total // MIB,
    }


def hostname() -> str:
    """The kernel's host name; no DNS lookup, which could block a ping for seconds."""
    return socket.gethostname()


def primary_ip_address() -> str | None:
    """The IPv4 address of the interface holding the default route, else the first usable
    non-loopback IPv4 address. libvirt's NAT bridges (virbr*) are last resort: every host
    has the same 192.168.122.1 there, useless to a controller."""
    addrs = {
        name: [a for a in entries if a.family == socket.AF_INET]
        for name, entries in psutil.net_if_addrs().items()
    }
    try:
        route = default_route(_ROUTE_FILE.read_text())
    except OSError:
        route = None
    if route is not None:
        iface, gateway = route
        candidates = addrs.get(iface, [])
        for addr in candidates:  # several addresses on one NIC: the one on the gateway's net
            if addr.netmask and gateway in ipaddress.ip_network(
                f"{addr.address}/{addr.netmask}", strict=False
            ):
                return str(addr.address)
        if candidates:
            return str(candidates[0].address)
    stats = psutil.net_if_stats()
    fallback: list[tuple[bool, bool, str]] = []
    for name, entries in addrs.items():
        for addr in entries:
            ip = ipaddress.IPv4Address(addr.address)
            if ip.is_loopback or ip.is_link_local:
                continue
            up = name in stats and stats[name].isup
            fallback.append((name.startswith("virbr"), not up, addr.address))
    return min(fallback)[2] if fallback else None


def default_route(route_table: str) -> tuple[str, ipaddress.IPv4Address] | None:
    """(interface, gateway) of the lowest-metric IPv4 default route in the text of
    /proc/net/route, or None."""
    best: tuple[int, str, ipaddress.IPv4Address] | None = None
    for line in route_table.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 8:
            continue
        iface, dest, gateway, flags, metric, mask = (fields[i] for i in (0, 1, 2, 3, 6, 7))
        try:
            if int(dest, 16) or int(mask, 16) or not int(flags, 16) & _RTF_UP:
                continue
            # The kernel prints each address as a hex word in host byte order.
            gw = ipaddress.IPv4Address(int(gateway, 16).to_bytes(4, sys.byteorder))
            if best is None or int(metric) < best[0]:
                best = (int(metric), iface, gw)
        except ValueError:
            continue
    return None if best is None else (best[1], best[2])


class _CpuSampler:
    """Per-core busy % since the previous call. psutil.cpu_percent(interval=None) keeps one
    process-wide previous sample that any other caller would reset, so keep our own."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last = psutil.cpu_times(percpu=True)

    def percentages(self) -> list[float]:
        now = psutil.cpu_times(percpu=True)
        with self._lock:
            last, self._last = self._last, now
        result = []
        # strict=False: a CPU hot-plugged between two calls has no earlier sample yet.
        for before, after in zip(last, now, strict=False):
            total = _total(after) - _total(before)
            idle = (after.idle + after.iowait) - (before.idle + before.iowait)
            busy = 0.0 if total <= 0 else 100.0 * (total - idle) / total
            result.append(round(min(100.0, max(0.0, busy)), 1))
        return result


def _total(times: Any) -> float:
    # Linux counts guest time inside user/nice already; adding it again would skew busy %.
    guest = float(getattr(times, "guest", 0.0)) + float(getattr(times, "guest_nice", 0.0))
    return float(sum(times)) - guest


_cpu_sampler = _CpuSampler()


def _cpu_info() -> dict[str, Any]:
    freq = psutil.cpu_freq()
    mhz = freq.current if freq is not None and freq.current else _cpuinfo().get("cpu MHz", 0.0)
    return {
        "count": os.cpu_count() or 1,
        "modelName": _cpuinfo().get("model name", platform.processor()),
        "mhz": round(float(mhz), 3),
        "loadAvg": [round(x, 2) for x in os.getloadavg()],
        "cpuCoresPercentages": _cpu_sampler.percentages(),
    }


@functools.cache
def _cpuinfo() -> dict[str, Any]:
    """The first processor's model name and nominal MHz from /proc/cpuinfo."""
    facts: dict[str, Any] = {}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return facts
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        key = key.strip()
        if not sep or key in facts:
            continue
        if key == "model name":
            facts[key] = value.strip()
        elif key == "cpu MHz":
            try:
                facts[key] = float(value)
            except ValueError:
                pass
    return facts


def _memory_info() -> dict[str, float]:
    vm, swap = psutil.virtual_memory(), psutil.swap_memory()
    return {
        "memTotal": _mib(vm.total),
        "memFree": _mib(vm.free),
        "memAvailable": _mib(vm.available),
        "buffers": _mib(getattr(vm, "buffers", 0)),
        "cached": _mib(getattr(vm, "cached", 0)),
        "swapTotal": _mib(swap.total),
        "swapFree": _mib(swap.free),
    }


def _mount_points(paths: Sequence[str]) -> dict[str, dict[str, float]]:
    """Usage of the file system holding each path, keyed by its block device (or its mount
    point when the source is not a device path, e.g. overlay or tmpfs). A path that does
    not exist is skipped: a ping must answer even if a pool directory is gone."""
    mounts = sorted(
        ((p.mountpoint, p.device) for p in psutil.disk_partitions(all=True)),
        key=lambda m: len(m[0]),
        reverse=True,
    )
    result: dict[str, dict[str, float]] = {}
    for path in paths:
        try:
            real = os.path.realpath(path)
            usage = psutil.disk_usage(real)
        except OSError as exc:
            log.debug("no disk info for %s: %s", path, exc)
            continue
        key = real
        for mountpoint, device in mounts:
            if real == mountpoint or real.startswith(mountpoint.rstrip("/") + "/"):
                key = device if device.startswith("/") else mountpoint
                break
        result[key] = {
            "total": _mib(usage.total),
            "free": _mib(usage.free),
            "used": _mib(usage.used),
            "percentUsed": round(usage.percent, 1),
        }
    return result


@functools.cache
def _os_info() -> dict[str, str]:
    release = _os_release()
    return {
        "distribution": release.get("NAME", release.get("ID", "Linux")),
        "version": release.get("VERSION_ID", release.get("VERSION", "")),
        "kernelVersion": platform.release(),
        "operatingSystem": "Linux",
    }


def _os_release() -> dict[str, str]:
    """os-release(5): KEY=value lines, values shell-quoted; parsed, never executed."""
    for candidate in ("/etc/os-release", "/usr/lib/os-release"):
        try:
            text = Path(candidate).read_text()
        except OSError:
            continue
        facts = {}
        for line in text.splitlines():
            key, sep, value = line.partition("=")
            if sep and key.strip() and not key.lstrip().startswith("#"):
                try:
                    words = shlex.split(value)
                except ValueError:
                    continue
                facts[key.strip()] = " ".join(words)
        return facts
    return {}


def _mib(value: float) -> float:
    return round(value / MIB, 3)
