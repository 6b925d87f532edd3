"""Build (or reuse) the real test guest: a Debian cloud kernel plus a busybox initramfs.

    python tests/guest/build.py [--out DIR] [--rebuild]

or, from tests: `from tests.guest.build import ensure_guest; guest = ensure_guest()`.

The guest is made from three Debian packages only (the cloud kernel, busybox-static and
qemu-guest-agent; qemu-ga's shared libraries come from the Debian host via `ldd`) and is
booted by direct kernel boot. What its /init does is described in tests/guest/README.md.

Results are cached under a directory named by a hash of the package versions and of
everything that shapes the image (the rootfs scripts, this builder, the module list), so
changing /init rebuilds and nothing else does. A build happens in a temporary directory
that is renamed into place, under an flock, so an interrupted build leaves no half cache
and two test processes building at once do not trip over each other.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `tests.guest` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    __package__ = "tests.guest"

from . import debs, kmod
from .newc import Archive

FORMAT = 1  # bump when the cache layout changes
CMDLINE = "console=ttyS0 quiet panic=-1"
PRUNE_AFTER_SECONDS = 3600
# Everything the guest needs that the cloud kernel ships as modules (dependencies are
# added automatically): virtio devices, the IDE cdrom that carries the seed on machine
# `pc`, ISO9660, the ACPI power button as an input device for acpid, and the ISA pvpanic
# device (ACPI QEMU0001) so a kernel panic reaches libvirt as `crashed`.
MODULES = (
    "virtio_pci", "virtio_blk", "virtio_net", "virtio_console", "virtio_rng",
    "virtio_scsi", "sd_mod", "ata_piix", "sr_mod", "isofs", "nls_utf8",
    "button", "evdev", "ext4", "pvpanic_mmio",
)
HERE = Path(__file__).resolve().parent
ROOTFS = HERE / "rootfs"
_KEY_SOURCES = ("build.py", "kmod.py", "newc.py", "debs.py")
_STATIC_FILES = {
    "/etc/passwd": "root:x:0:0:root:/root:/bin/sh\n",
    "/etc/group": "root:x:0:\n",
    "/etc/hosts": "127.0.0.1 localhost\n",
    "/etc/resolv.conf": "",
    "/etc/profile": "export PATH=/sbin:/bin:/usr/sbin:/usr/bin\nPS1='\\h:\\w# '\n",
    "/etc/os-release": 'NAME="herdsman test guest"\nID=herdsman-guest\n'
    f'VERSION_ID="{FORMAT}"\nPRETTY_NAME="herdsman test guest"\n',
}


@dataclass(frozen=True)
class GuestImage:
    """Paths and boot parameters of a built guest; `dir` holds manifest.json too."""

    kernel: Path
    initrd: Path
    cmdline: str
    kernel_version: str
    dir: Path


def default_cache_dir() -> Path:
    env = os.environ.get("HERDSMAN_GUEST_CACHE")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/var/cache/herdsman/test-guest")
    return Path.home() / ".cache" / "herdsman" / "test-guest"


def cache_key(packages: Sequence[debs.Package]) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps([FORMAT, CMDLINE, list(MODULES)]).encode())
    for pkg in packages:
        digest.update(f"\0{pkg.name}={pkg.version}".encode())
    for path in sorted(ROOTFS.iterdir()) + [HERE / name for name in _KEY_SOURCES]:
        digest.update(b"\0" + path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def ensure_guest(cache_dir: Path | str | None = None, *, rebuild: bool = False) -> GuestImage:
    """Return the guest for the current package versions, building it if needed."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    packages = debs.resolve()
    key = cache_key(packages)
    target = root / key
    if not rebuild and (image := _load(target)) is not None:
        return image
    make_dirs(root)
    with locked(root / ".lock"):
        if not rebuild and (image := _load(target)) is not None:
            return image  # another process built it while we waited
        for stale in root.glob(".build-*"):
            shutil.rmtree(stale, ignore_errors=True)  # left by an interrupted build
        work = root / f".build-{key}-{os.getpid()}"
        work.mkdir(mode=0o755)
        try:
            debdir = root / "debs"
            make_dirs(debdir)
            files = debs.download(packages, debdir)
            debs.prune(debdir, packages)
            out = work / "out"
            _build(files, packages, work, out)
            if target.exists():  # --rebuild: move the old one aside, removed below
                target.rename(work / "previous")
            out.rename(target)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        _prune(root, keep=target)
    image = _load(target)
    if image is None:
        raise RuntimeError(f"guest build finished but {target} is incomplete")
    return image


def _build(
    files: dict[str, Path], packages: Sequence[debs.Package], work: Path, out: Path
) -> None:
    started = time.monotonic()
    tree = work / "tree"
    for path in files.values():
        debs.extract(path, tree, _needed_from_packages)
    (moddir,) = (tree / "lib" / "modules").iterdir()
    kernel_version = moddir.name
    modules = kmod.ModuleTree(moddir).load_order(MODULES)

    archive = Archive()
    _add_userland(archive, tree)
    for mod in modules:
        archive.add_file(f"/lib/modules/{kernel_version}/{mod.name}.ko", mod.image())
    archive.add_file(
        "/etc/modules", "".join(f"{kernel_version}/{m.name}.ko\n" for m in modules).encode()
    )

    out.mkdir(mode=0o755)
    initrd_size = archive.write_gzip(out / "initrd.img")
    shutil.copyfile(tree / "boot" / f"vmlinuz-{kernel_version}", out / "vmlinuz")
    manifest = {
        "format": FORMAT,
        "packages": {p.name: p.version for p in packages},
        "kernel_version": kernel_version,
        "cmdline": CMDLINE,
        "modules": [m.name for m in modules],
        "initrd_bytes": initrd_size,
        "build_seconds": round(time.monotonic() - started, 2),
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    for path in out.iterdir():
        path.chmod(0o644)  # qemu runs as libvirt-qemu under qemu:///system
    out.chmod(0o755)


def _needed_from_packages(name: str) -> bool:
    """The few package files the guest uses: kernel, modules, busybox, qemu-ga."""
    return (
        name.startswith(("boot/vmlinuz-", "lib/modules/"))
        or name in ("bin/busybox", "usr/sbin/qemu-ga")
    )


def _add_userland(archive: Archive, tree: Path) -> None:
    for path, mode in (("/proc", 0o755), ("/sys", 0o755), ("/dev", 0o755), ("/run", 0o755),
                       ("/tmp", 0o1777), ("/root", 0o700), ("/mnt/root", 0o755),
                       ("/mnt/seed", 0o755), ("/var/log", 0o755), ("/usr/bin", 0o755)):
        archive.add_dir(path, mode)
    archive.add_char_device("/dev/console", 5, 1)  # init's stdio before devtmpfs is mounted
    archive.add_symlink("/var/run", "../run")

    archive.add_host_file("/bin/busybox", tree / "bin" / "busybox", 0o755)
    archive.add_symlink("/bin/sh", "busybox")
    archive.add_host_file("/init", ROOTFS / "init", 0o755)
    archive.add_host_file("/etc/udhcpc/default.script", ROOTFS / "udhcpc.script", 0o755)
    archive.add_host_file("/etc/acpi/PWRF/00000080", ROOTFS / "power-button", 0o755)
    archive.add_host_file("/sbin/shutdown", ROOTFS / "shutdown", 0o755)
    for name in ("poweroff", "reboot", "halt"):  # busybox --install keeps existing files
        archive.add_symlink(f"/sbin/{name}", "shutdown")
    for path, text in _STATIC_FILES.items():
        archive.add_file(path, text.encode())

    qga = tree / "usr" / "sbin" / "qemu-ga"
    archive.add_host_file("/usr/sbin/qemu-ga", qga, 0o755)
    for lib in shared_libraries(qga):
        archive.add_host_file(str(lib), lib, 0o755)


def shared_libraries(binary: Path) -> list[Path]:
    """Absolute paths of the libraries (and loader) `ldd` resolves for `binary` on this host."""
    proc = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, check=True)
    missing = [line.split()[0] for line in proc.stdout.splitlines() if "not found" in line]
    if missing:
        raise RuntimeError(
            f"{binary.name} needs libraries this host lacks: {', '.join(missing)} "
            "(install qemu-guest-agent's dependencies with apt-get)"
        )
    return [Path(p) for p in re.findall(r"(?:=>\s*|^\s*)(/\S+)\s+\(0x", proc.stdout, re.MULTILINE)]


def _load(directory: Path) -> GuestImage | None:
    try:
        manifest = json.loads((directory / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    kernel, initrd = directory / "vmlinuz", directory / "initrd.img"
    if manifest.get("format") != FORMAT or not (kernel.is_file() and initrd.is_file()):
        return None
    _warn_if_hidden(directory)
    try:
        os.utime(directory / "manifest.json")  # last use, for pruning
    except OSError:
        pass
    return GuestImage(kernel, initrd, manifest["cmdline"], manifest["kernel_version"], directory)


def _prune(root: Path, keep: Path) -> None:
    """Remove other builds unused for an hour (another checkout may still boot them)."""
    cutoff = time.time() - PRUNE_AFTER_SECONDS
    for entry in root.iterdir():
        manifest = entry / "manifest.json"
        if entry != keep and manifest.exists() and manifest.stat().st_mtime < cutoff:
            shutil.rmtree(entry, ignore_errors=True)


def make_dirs(path: Path) -> None:
    """mkdir -p with 0755 for the folders we create, whatever the umask."""
    missing: list[Path] = []
    p = path
    while not p.exists():
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        try:
            d.mkdir(mode=0o755)
        except FileExistsError:
            continue
        d.chmod(0o755)


def _warn_if_hidden(directory: Path) -> None:
    """Under qemu:///system qemu (libvirt-qemu) must traverse every folder above the kernel."""
    if os.geteuid() != 0:
        return
    closed = [p for p in [directory, *directory.parents] if not p.stat().st_mode & stat.S_IXOTH]
    if closed:
        warnings.warn(
            f"{closed[0]} is not traversable by other users; qemu running as libvirt-qemu "
            f"cannot read the guest kernel under {directory}",
            stacklevel=3,
        )


@contextmanager
def locked(path: Path) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def write_image_manifest(image: GuestImage, path: Path) -> None:
    """A `kernel:` image manifest (drivers/libvirt/images.py) pointing at this build."""
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {"kernel": image.kernel.as_uri(), "initrd": image.initrd.as_uri(), "cmdline": image.cmdline}
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(body, indent=2) + "\n")
    os.replace(tmp, path)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build or reuse the herdsman test guest.")
    parser.add_argument("--out", type=Path, help="cache directory (default: %(default)s)",
                        default=default_cache_dir())
    parser.add_argument("--rebuild", action="store_true", help="build even if cached")
    parser.add_argument("--image-manifest", type=Path,
                        help="also write a herdsman kernel: image manifest for this guest at this path")
    args = parser.parse_args(argv)
    started = time.monotonic()
    image = ensure_guest(args.out, rebuild=args.rebuild)
    if args.image_manifest is not None:
        write_image_manifest(image, args.image_manifest)
    manifest = json.loads((image.dir / "manifest.json").read_text())
    print(json.dumps({
        "kernel": str(image.kernel),
        "initrd": str(image.initrd),
        "cmdline": image.cmdline,
        "kernel_version": image.kernel_version,
        "dir": str(image.dir),
        "initrd_bytes": manifest["initrd_bytes"],
        "build_seconds": manifest["build_seconds"],
        "elapsed_seconds": round(time.monotonic() - started, 2),
    }, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
