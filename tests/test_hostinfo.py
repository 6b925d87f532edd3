"""Host facts checked against what the kernel and standard tools report for this machine."""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import psutil

from agent.hostinfo import default_route, host_capacity, host_info, hostname, primary_ip_address

MIB = 1024 * 1024


def _info(*paths: str) -> dict:
    return host_info(
        libvirt_version="9.0.0",
        qemu_version="7.2.0",
        domain_type="qemu",
        disk_paths=list(paths) or ["/"],
    )


def _meminfo_mib(key: str) -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1]) / 1024
    raise KeyError(key)


def test_a_call_is_cheap_enough_for_every_ping() -> None:
    started = time.perf_counter()
    info = _info("/", "/var/lib")
    elapsed = time.perf_counter() - started
    assert elapsed < 0.05, f"host_info took {elapsed * 1000:.1f} ms"
    json.dumps(info)  # goes on the wire as is


def test_layout_is_cattles() -> None:
    info = _info()
    assert set(info) == {"cpuInfo", "memoryInfo", "diskInfo", "osInfo", "hypervisorInfo"}
    assert set(info["cpuInfo"]) == {"count", "modelName", "mhz", "loadAvg", "cpuCoresPercentages"}
    assert set(info["memoryInfo"]) == {
        "memTotal",
        "memFree",
        "memAvailable",
        "buffers",
        "cached",
        "swapTotal",
        "swapFree",
    }
    assert info["hypervisorInfo"] == {
        "libvirtVersion": "9.0.0",
        "qemuVersion": "7.2.0",
        "domainType": "qemu",
    }


def test_cpu_facts_match_the_kernel() -> None:
    cpu = _info()["cpuInfo"]
    assert cpu["count"] == os.cpu_count()
    assert len(cpu["cpuCoresPercentages"]) == os.cpu_count()
    assert all(0.0 <= p <= 100.0 for p in cpu["cpuCoresPercentages"])
    assert len(cpu["loadAvg"]) == 3 and all(x >= 0 for x in cpu["loadAvg"])
    assert cpu["mhz"] > 0
    cpuinfo = Path("/proc/cpuinfo").read_text()
    assert cpu["modelName"] and f": {cpu['modelName']}" in cpuinfo


def test_core_percentages_show_load_since_the_previous_call() -> None:
    _info()
    spin_until = time.perf_counter() + 0.4
    while time.perf_counter() < spin_until:  # keep one core busy between two calls
        pass
    started = time.perf_counter()
    cores = _info()["cpuInfo"]["cpuCoresPercentages"]
    assert time.perf_counter() - started < 0.05  # never a blocking sample
    assert sum(cores) >= 50.0, cores  # at least half a core busy (ours), whoever else runs


def test_memory_matches_proc_meminfo() -> None:
    mem = _info()["memoryInfo"]
    assert abs(mem["memTotal"] - _meminfo_mib("MemTotal")) < 1
    assert abs(mem["swapTotal"] - _meminfo_mib("SwapTotal")) < 1
    assert 0 < mem["memAvailable"] <= mem["memTotal"]
    assert 0 < mem["memFree"] <= mem["memTotal"]
    assert mem["swapFree"] <= mem["swapTotal"] + 0.001


def test_disk_info_for_root_and_paths() -> None:
    points = _info("/", "/var/lib", "/does/not/exist")["diskInfo"]["mountPoints"]
    usage = shutil.disk_usage("/")
    root = next((v for v in points.values() if abs(v["total"] - usage.total / MIB) < 1), None)
    assert root is not None, points
    assert abs(root["free"] - usage.free / MIB) < 64  # others write to this disk meanwhile
    assert 0 <= root["percentUsed"] <= 100
    root_device = next(p.device for p in psutil.disk_partitions(all=True) if p.mountpoint == "/")
    if root_device.startswith("/"):
        assert root_device in points
    # /var/lib on the same file system is one entry; a missing path is no entry.
    same_fs = os.stat("/").st_dev == os.stat("/var/lib").st_dev
    assert len(points) == (1 if same_fs else 2)


def test_os_facts() -> None:
    os_info = _info()["osInfo"]
    assert os_info["operatingSystem"] == "Linux"
    assert os_info["kernelVersion"] == os.uname().release
    release = Path("/etc/os-release").read_text()
    assert (
        f'NAME="{os_info["distribution"]}"' in release
        or f"NAME={os_info['distribution']}" in release
    )
    assert os_info["version"] in release


def test_capacity() -> None:
    cap = host_capacity("/")
    assert cap["memory"] == psutil.virtual_memory().total
    assert abs(cap["memory"] / MIB - _meminfo_mib("MemTotal")) < 1
    assert cap["milliCpu"] == os.cpu_count() * 1000
    assert cap["localStorageMb"] == shutil.disk_usage("/").total // MIB


def test_hostname() -> None:
    assert hostname() == os.uname().nodename == socket.gethostname()


def test_primary_ip_is_this_hosts_default_route_address() -> None:
    ip = primary_ip_address()
    own = {
        a.address
        for entries in psutil.net_if_addrs().values()
        for a in entries
        if a.family == socket.AF_INET
    }
    assert ip in own
    assert not ipaddress.ip_address(ip).is_loopback
    if shutil.which("ip"):
        route = subprocess.run(
            ["ip", "-4", "route", "show", "default"], capture_output=True, text=True
        ).stdout.split()
        if "dev" in route:
            dev = route[route.index("dev") + 1]
            shown = subprocess.run(
                ["ip", "-4", "-o", "addr", "show", "dev", dev], capture_output=True, text=True
            ).stdout
            assert f"inet {ip}/" in shown


ROUTES = """Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT
wlan0\t00000000\t0101A8C0\t0003\t0\t0\t600\t00000000\t0\t0\t0
eth0\t00000000\t010200C0\t0003\t0\t0\t100\t00000000\t0\t0\t0
eth0\t000200C0\t00000000\t0001\t0\t0\t100\t00FFFFFF\t0\t0\t0
eth1\t00000000\t01010A0A\t0002\t0\t0\t0\t00000000\t0\t0\t0
"""


def test_default_route_picks_the_lowest_metric_route_that_is_up() -> None:
    iface, gateway = default_route(ROUTES)  # eth1's route has metric 0 but is not up
    assert iface == "eth0"
    assert gateway == ipaddress.IPv4Address("192.0.2.1")
    assert default_route(ROUTES.splitlines()[0] + "\n") is None
    assert default_route("") is None


def test_real_route_table_parses() -> None:
    table = Path("/proc/net/route").read_text()
    route = default_route(table)
    if route is not None:
        assert route[0] in psutil.net_if_addrs()
