"""Shared by the tests that run nft and iptables for real (root): private names, cleanup, views,
and the ways users reach a published port (this host, another host, a plain connect).

Each test works in a table of its own (`hmt_<token>`) with its own FORWARD-rule comment, so runs
side by side never see each other's rules, and the production table `herdsman` is never named.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from drivers.ports.ruleset import TableConfig


def needs_root_nft() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to change the host's nftables ruleset (run as root, as CI does)")
    if shutil.which("nft") is None:
        pytest.skip("needs the nft command (scripts/setup installs nftables)")


@pytest.fixture
def table() -> Iterator[TableConfig]:
    needs_root_nft()
    config = TableConfig(name=f"hmt_{uuid.uuid4().hex[:8]}")
    yield config
    drop_table(config.name)


def drop_table(name: str) -> None:
    """A test table and its FORWARD rule, whatever state a test left them in (nothing to do
    on a host without nft: no agent could have made them)."""
    if shutil.which("nft") is None or shutil.which("iptables") is None:
        return
    subprocess.run(["nft", "delete", "table", "ip", name], capture_output=True, check=False)
    drop_forward_rules(f"{name}-published-ports")


def drop_forward_rules(comment: str) -> None:
    lines = subprocess.run(["iptables", "-w", "-S", "FORWARD"], capture_output=True, text=True).stdout.splitlines()
    for line in lines:
        if f"--comment {comment}" in line:
            subprocess.run(["iptables", "-w", "-D", *line.split()[1:]], capture_output=True, check=False)


def nft_json(*what: str) -> list[dict[str, Any]] | None:
    proc = subprocess.run(["nft", "-j", "list", *what], capture_output=True, text=True)
    return json.loads(proc.stdout)["nftables"] if proc.returncode == 0 else None


def _strip_counters(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: ({} if k == "counter" else _strip_counters(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [_strip_counters(v) for v in value]
    return value


def ruleset_except(table: str) -> list[dict[str, Any]]:
    """The whole ruleset, our table left out and counters zeroed (they move with traffic)."""
    items = nft_json("ruleset") or []
    return [_strip_counters(i) for i in items
            if "metainfo" not in i and next(iter(i.values())).get("table", next(iter(i.values())).get("name")) != table]


def foreign_ruleset() -> list[dict[str, Any]]:
    """The ruleset without any herdsman table (ours, or another test run's), counters zeroed."""
    items = nft_json("ruleset") or []

    def table_of(item: dict[str, Any]) -> str:
        body = next(iter(item.values()))
        return body.get("table", body.get("name", ""))
    return [_strip_counters(i) for i in items
            if "metainfo" not in i and not (table_of(i) == "herdsman" or table_of(i).startswith("hmt_"))]


def table_text(name: str) -> str | None:
    """`nft list table ip NAME` (no handles: a table rewritten with the same content reads the same)."""
    proc = subprocess.run(["nft", "list", "table", "ip", name], capture_output=True, text=True)
    return proc.stdout if proc.returncode == 0 else None


def forward_chain() -> list[str]:
    return [line for line in subprocess.run(["iptables", "-w", "-S", "FORWARD"], capture_output=True,
                                            text=True, check=True).stdout.splitlines() if line.startswith("-A ")]


def elements(listing: list[dict[str, Any]], name: str) -> list[Any]:
    for item in listing:
        for kind in ("map", "set"):
            if kind in item and item[kind]["name"] == name:
                return item[kind].get("elem", [])
    raise AssertionError(f"no set or map {name} in the listing")


def chains(listing: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {i["chain"]["name"]: i["chain"] for i in listing if "chain" in i}


def published(listing: list[dict[str, Any]]) -> dict[tuple[str, str, int], tuple[str, int, str]]:
    """The `published` map as (host address, protocol, port) → (guest, guest port, comment)."""
    found = {}
    for key, value in elements(listing, "published"):
        elem = key["elem"]
        address, proto, port = elem["val"]["concat"]
        if isinstance(address, dict):
            address = f"{address['prefix']['addr']}/{address['prefix']['len']}"
        guest, guest_port = value["concat"]
        found[(address, proto, port)] = (guest, guest_port, elem.get("comment", ""))
    return found


# -- reaching a published port the ways users do --------------------------------------------------
@dataclass
class Neighbour:
    """Another host: a network namespace joined to this one by a veth pair."""

    namespace: str
    host_address: str  # this host's end, the address the neighbour connects to

    def fetch(self, url: str) -> subprocess.CompletedProcess[str]:
        code = "import sys, urllib.request; sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())"
        return subprocess.run(["ip", "netns", "exec", self.namespace, sys.executable, "-c", code, url],
                              capture_output=True, text=True, timeout=30)


@contextlib.contextmanager
def neighbour() -> Iterator[Neighbour]:
    token = uuid.uuid4().hex[:8]
    ns, here, there = f"hmt-{token}", f"hmt{token}a", f"hmt{token}b"
    subnet = ipaddress.IPv4Network(f"100.{random.randint(80, 120)}.{random.randint(0, 255)}.{4 * random.randint(0, 63)}/30")
    mine, theirs = (str(a) for a in subnet.hosts())
    try:
        for cmd in (["ip", "netns", "add", ns],
                    ["ip", "link", "add", here, "type", "veth", "peer", "name", there],
                    ["ip", "link", "set", there, "netns", ns],
                    ["ip", "addr", "add", f"{mine}/30", "dev", here],
                    ["ip", "link", "set", here, "up"],
                    ["ip", "-n", ns, "addr", "add", f"{theirs}/30", "dev", there],
                    ["ip", "-n", ns, "link", "set", there, "up"],
                    ["ip", "-n", ns, "link", "set", "lo", "up"],
                    ["ip", "-n", ns, "route", "add", "default", "via", mine]):
            subprocess.run(cmd, check=True, capture_output=True)
        yield Neighbour(ns, mine)
    finally:
        subprocess.run(["ip", "link", "del", here], capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def host_address() -> str:
    """This host's address on its default route (what other machines call it)."""
    route = json.loads(subprocess.run(["ip", "-j", "route", "get", "192.0.2.123"], capture_output=True, text=True,
                                      check=True).stdout)[0]
    return route["prefsrc"]


async def fetch(url: str, attempts: int = 20) -> str:
    """GET url from this host; a few tries, the guest's httpd may still be starting."""
    error: Exception | None = None
    for _ in range(attempts):
        try:
            return await asyncio.to_thread(_get, url)
        except OSError as exc:
            error = exc
            await asyncio.sleep(0.5)
    raise AssertionError(f"{url}: {error}")


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.read().decode()


def refused(address: str, port: int) -> bool:
    try:
        with socket.create_connection((address, port), timeout=3):
            return False
    except OSError:
        return True
