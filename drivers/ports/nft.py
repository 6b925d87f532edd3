"""Running `nft`: apply a script in one transaction, read our table back as JSON.

The `nft` command (Debian's nftables package) rather than a binding to libnftables: it is the
interface every distribution ships and documents, scripts go in on stdin (nothing is quoted by
a shell), and a failed script changes nothing (nft applies a file as one transaction).
"""

from __future__ import annotations

import json
import subprocess
from typing import Any

NFT = "nft"


class NftError(RuntimeError):
    """nft refused a script or a listing; the message carries nft's own error text."""


def _run(args: list[str], script: str | None = None, *, nft: str = NFT) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run([nft, *args], input=script, capture_output=True, text=True, timeout=30, check=False)
    except FileNotFoundError:
        raise NftError(f"{nft} not found: install the nftables package") from None


def apply(script: str, *, nft: str = NFT) -> None:
    """Apply a whole script atomically (`nft -f -`)."""
    proc = _run(["-f", "-"], script, nft=nft)
    if proc.returncode != 0:
        raise NftError(f"nft -f failed: {proc.stderr.strip()}")


def list_json(*what: str, nft: str = NFT) -> list[dict[str, Any]] | None:
    """`nft -j list <what>` as its list of objects; None when the table (or set) does not exist."""
    proc = _run(["-j", "list", *what], nft=nft)
    if proc.returncode != 0:
        if "No such file or directory" in proc.stderr:
            return None
        raise NftError(f"nft list {' '.join(what)} failed: {proc.stderr.strip()}")
    return json.loads(proc.stdout)["nftables"]


def set_elements(table: str, name: str, *, family: str = "ip", nft: str = NFT) -> list[Any]:
    """The elements of a set in one of our tables ([] when the table or set is missing)."""
    listing = list_json("set", family, table, name, nft=nft) or []
    for item in listing:
        if "set" in item:
            return list(item["set"].get("elem", []))
    return []
