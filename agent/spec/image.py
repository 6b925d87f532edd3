"""The `imageUuid` reference: which boot image a VM uses, and how it is verified.

Forms accepted (documented in the README):
- ``file:///var/lib/images/debian-12.qcow2`` or ``https://host/path/image.qcow2[.gz|.xz]`` — a qcow2
  or raw disk image; an optional ``#sha256=<hex>`` (or sha512/sha1/md5) fragment pins its checksum.
- ``kernel:<url of a manifest.json>`` — a direct-kernel-boot image: the manifest names a kernel, an
  optional initrd and a default command line (for microVM-style guests and the test guest).
``docker:`` images (what Rancher 1.x used for containers) cannot boot a VM and are rejected.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit

_DIGEST_LENGTHS = {"md5": 32, "sha1": 40, "sha256": 64, "sha512": 128}
_HEX_RE = re.compile(r"^[0-9a-f]+$")


@dataclass(frozen=True)
class ImageRef:
    kind: Literal["disk", "kernel"]
    url: str
    checksum: str | None = None  # "<algorithm>:<hex>"

    @property
    def scheme(self) -> str:
        return urlsplit(self.url).scheme


def parse_checksum(text: str) -> str:
    """'sha256:<hex>', 'sha256=<hex>' or a bare hex digest (algorithm by length, as Cattle did)."""
    text = text.strip().lower()
    algo, sep, digest = text.replace("=", ":").partition(":")
    if not sep:
        algo, digest = "", text
    if not _HEX_RE.match(digest):
        raise ValueError(f"checksum {text!r} is not a hex digest")
    if not algo:
        algo = next((a for a, n in _DIGEST_LENGTHS.items() if n == len(digest)), "")
        if not algo:
            raise ValueError(f"checksum of {len(digest)} hex digits matches no md5/sha1/sha256/sha512 digest")
    if _DIGEST_LENGTHS.get(algo) != len(digest):
        raise ValueError(f"checksum algorithm {algo!r} needs {_DIGEST_LENGTHS.get(algo, '?')} hex digits")
    return f"{algo}:{digest}"


def _check_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
            raise ValueError(f"{url!r}: a file URL needs an absolute path (file:///path/image.qcow2)")
    elif parts.scheme in ("http", "https"):
        if not parts.hostname:
            raise ValueError(f"{url!r} has no host")
    else:
        raise ValueError(f"{url!r}: image URLs must be file://, http:// or https://")
    if any(ord(c) < 0x21 for c in url):
        raise ValueError(f"{url!r} contains white space or control characters")
    return url


def parse_image_ref(text: str) -> ImageRef:
    if text.startswith("docker:"):
        raise ValueError(
            f"{text!r} is a container image; a virtual machine boots a disk image "
            "(file://, http(s):// qcow2/raw) or a kernel: manifest"
        )
    kind: Literal["disk", "kernel"] = "disk"
    if text.startswith("kernel:"):
        kind, text = "kernel", text[len("kernel:") :]
    url, _, fragment = text.partition("#")
    checksum = None
    if fragment:
        checksum = parse_checksum(fragment)
    return ImageRef(kind=kind, url=_check_url(url), checksum=checksum)
