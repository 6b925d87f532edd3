"""Direct-kernel-boot images: the manifest and the on-disk kernel directory.

The manifest (documented in `drivers.libvirt.images`) is validated strictly: unknown keys are
refused, checksums are normalised to ``<algo>:<hex>``, the command line may hold no control
characters and fits the kernel's 2048-byte limit. A kernel directory holds ``kernel``,
optionally ``initrd``, and the validated ``manifest.json``; it is built in a staging
directory next to it and renamed into place, so it is either complete or absent.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Annotated
from urllib.parse import urljoin, urlsplit

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from agent.spec.image import ImageRef, parse_checksum, parse_image_ref
from drivers.libvirt.domxml.inputs import KernelBoot
from drivers.libvirt.images_fetch import ImageError

MANIFEST_LIMIT = 64 << 10
_CMDLINE_MAX = 2048  # the x86 kernel's COMMAND_LINE_SIZE


def _printable(value: str) -> str:
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        raise ValueError("contains control characters")
    return value


_Text = Annotated[str, Field(min_length=1, max_length=4096), AfterValidator(_printable)]
_Checksum = Annotated[str, AfterValidator(parse_checksum)]


class KernelChecksums(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    kernel: _Checksum | None = None
    initrd: _Checksum | None = None


class KernelManifest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    kernel: _Text
    initrd: _Text | None = None
    cmdline: Annotated[str, Field(max_length=_CMDLINE_MAX), AfterValidator(_printable)] = "console=ttyS0"
    checksums: KernelChecksums = KernelChecksums()


def parse_manifest(raw: bytes, shown: str) -> KernelManifest:
    try:
        return KernelManifest.model_validate_json(raw)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'manifest'}: {e['msg']}" for e in exc.errors())
        raise ImageError(f"kernel manifest {shown}: {problems}") from None


def resolve_member(manifest_url: str, member: str, checksum: str | None, shown: str) -> ImageRef:
    """The URL and checksum of a file the manifest names (relative to the manifest).

    A manifest that was downloaded must not name a ``file://`` URL: it would make the agent
    copy a host file (say /etc/shadow) into a world-readable kernel directory.
    """
    try:
        ref = parse_image_ref(urljoin(manifest_url, member))
    except ValueError as exc:
        raise ImageError(f"kernel manifest {shown}: {exc}") from None
    if ref.kind != "disk":
        raise ImageError(f"kernel manifest {shown}: {member!r} is not a file URL")
    if ref.scheme == "file" and urlsplit(manifest_url).scheme != "file":
        raise ImageError(f"kernel manifest {shown}: a downloaded manifest may not name host files ({member!r})")
    if checksum and ref.checksum and checksum != ref.checksum:
        raise ImageError(f"kernel manifest {shown}: two different checksums for {member!r}")
    return ImageRef(kind="disk", url=ref.url, checksum=checksum or ref.checksum)


def sweep_staging(parent: Path, horizon: float) -> None:
    """Create the kernels directory (0755: qemu's user walks it); drop stale staging dirs."""
    parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    for entry in parent.glob(".tmp-*"):
        if entry.lstat().st_mtime < horizon:
            shutil.rmtree(entry, ignore_errors=True)


def make_staging(parent: Path) -> Path:
    staging = Path(tempfile.mkdtemp(dir=parent, prefix=".tmp-"))
    os.chmod(staging, 0o755)
    return staging


def commit_kernel_dir(staging: Path, target: Path, manifest: KernelManifest) -> None:
    (staging / "manifest.json").write_text(manifest.model_dump_json())
    for entry in staging.iterdir():
        os.chmod(entry, 0o644)
    try:
        os.rename(staging, target)
    except OSError:
        if not (target / "manifest.json").is_file():  # not a complete copy someone else made
            raise


def read_kernel_dir(target: Path, shown: str) -> KernelBoot | None:
    """The boot record of a complete kernel directory, None when there is none."""
    try:
        raw = (target / "manifest.json").read_bytes()
    except FileNotFoundError:
        return None
    manifest = parse_manifest(raw, shown)
    return KernelBoot(
        kernel=str(target / "kernel"),
        initrd=str(target / "initrd") if manifest.initrd else None,
        cmdline=manifest.cmdline,
    )
