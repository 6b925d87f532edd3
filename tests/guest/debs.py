"""The three Debian packages the guest is made of: which versions, fetch, unpack.

Uses only apt's ordinary clients (`apt-cache`, `apt-get download`, `dpkg-deb`), which work
without root. Versions are resolved before anything is downloaded so that a cached guest
can be found without touching the network.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import tarfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

KERNEL_META = "linux-image-cloud-amd64"
BUSYBOX = "busybox-static"
GUEST_AGENT = "qemu-guest-agent"


class PackageError(RuntimeError):
    """A package could not be resolved or fetched; the message says what to do."""


@dataclass(frozen=True)
class Package:
    name: str
    version: str
    arch: str = "amd64"  # "all" for architecture-independent packages (cloud-init)

    @property
    def deb_name(self) -> str:
        """The file name `apt-get download` gives it (':' in an epoch is URL-escaped)."""
        return f"{self.name}_{self.version.replace(':', '%3a')}_{self.arch}.deb"


def _run(args: Sequence[str], cwd: Path | None = None) -> str:
    proc = subprocess.run(
        list(args), cwd=cwd, capture_output=True, text=True, check=False,
        env={**os.environ, "LC_ALL": "C"},
    )
    if proc.returncode != 0:
        raise PackageError(f"{' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def kernel_package_name() -> str:
    """`linux-image-<version>-cloud-amd64`, the package the cloud kernel meta-package pulls in."""
    out = _run(["apt-cache", "depends", KERNEL_META])
    for match in re.finditer(r"^\s*Depends:\s*(linux-image-\S+-cloud-amd64)\s*$", out, re.MULTILINE):
        return match.group(1)
    raise PackageError(
        f"`apt-cache depends {KERNEL_META}` names no kernel package; run `apt-get update`"
    )


def candidate_versions(names: Sequence[str]) -> dict[str, str]:
    """The version `apt-get download` would fetch for each name."""
    out = _run(["apt-cache", "policy", *names])
    found: dict[str, str] = {}
    current: str | None = None
    for line in out.splitlines():
        if line and not line[0].isspace() and line.endswith(":"):
            current = line[:-1]
        elif current and line.strip().startswith("Candidate:"):
            found[current] = line.split(":", 1)[1].strip()
    missing = [n for n in names if found.get(n) in (None, "(none)")]
    if missing:
        raise PackageError(
            f"no installable version of {', '.join(missing)}; run `apt-get update` (as root)"
        )
    return found


def resolve() -> tuple[Package, Package, Package]:
    """(kernel, busybox, guest agent) at the versions apt would install now."""
    kernel = kernel_package_name()
    versions = candidate_versions([kernel, BUSYBOX, GUEST_AGENT])
    return (
        Package(kernel, versions[kernel]),
        Package(BUSYBOX, versions[BUSYBOX]),
        Package(GUEST_AGENT, versions[GUEST_AGENT]),
    )


def download(packages: Sequence[Package], dest: Path) -> dict[str, Path]:
    """Fetch the exact versions into `dest` (kept there, so rebuilds need no network).

    `apt-get update` runs only when the download fails and we are root, because stale
    package lists are the usual reason and only root can refresh them.
    """
    missing = [p for p in packages if not (dest / p.deb_name).is_file()]
    if missing:
        specs = [f"{p.name}={p.version}" for p in missing]
        try:
            _run(["apt-get", "download", "-q", *specs], cwd=dest)
        except PackageError:
            if os.geteuid() != 0:
                raise
            _run(["apt-get", "update", "-q"])
            _run(["apt-get", "download", "-q", *specs], cwd=dest)
    paths = {p.name: dest / p.deb_name for p in packages}
    for name, path in paths.items():
        if not path.is_file():
            raise PackageError(f"apt-get download did not produce {path.name} for {name}")
        path.chmod(0o644)
    return paths


def prune(dest: Path, keep: Sequence[Package]) -> None:
    """Remove older downloads of the same packages so the cache does not grow forever."""
    wanted = {p.deb_name for p in keep}
    prefixes = tuple(f"{p.name}_" for p in keep) + ("linux-image-",)
    for path in dest.glob("*.deb"):
        if path.name not in wanted and path.name.startswith(prefixes):
            path.unlink(missing_ok=True)


def _extract_member(tar: tarfile.TarFile, member: tarfile.TarInfo, dest: Path) -> None:
    """tarfile's "data" filter where Python has it (3.11.4+); the same checks by hand before
    that (Debian 12's python3 is 3.11.2): no absolute paths, no '..', no links leaving dest."""
    if hasattr(tarfile, "data_filter"):
        tar.extract(member, dest, filter="data")
        return
    target = (dest / member.name).resolve()
    if not str(target).startswith(str(dest.resolve()) + "/") or member.isdev():
        raise PackageError(f"unsafe member {member.name!r} in package")
    if member.issym() or member.islnk():
        link = (target.parent / member.linkname).resolve() if member.issym() else (dest / member.linkname).resolve()
        if not str(link).startswith(str(dest.resolve()) + "/"):
            raise PackageError(f"link {member.name!r} points outside the package")
    member.mode &= 0o755
    tar.extract(member, dest)


def extract(deb: Path, dest: Path, wanted: Callable[[str], bool] = lambda name: True) -> None:
    """Unpack the members whose path (like `usr/sbin/qemu-ga`) passes `wanted`.

    dpkg-deb only streams the data tarball here and this process writes the files, so a
    build killed midway leaves no extractor behind still writing into the build folder.
    """
    proc = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    try:
        with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
            for member in tar:
                if wanted(member.name.removeprefix("./")):
                    _extract_member(tar, member, dest)
    finally:
        proc.stdout.close()
        if proc.wait() not in (0, -signal.SIGPIPE):
            raise PackageError(f"dpkg-deb --fsys-tarfile {deb.name} failed ({proc.returncode})")
