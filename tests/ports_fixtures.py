"""Shared by the tests that run nft and iptables for real (root): private names, cleanup, views.

Each test works in a table of its own (`hmt_<token>`) with its own FORWARD-rule comment, so runs
side by side never see each other's rules, and the production table `herdsman` is never named.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
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
    subprocess.run(["nft", "delete", "table", "ip", config.name], capture_output=True, check=False)
    drop_forward_rules(f"{config.name}-published-ports")


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
