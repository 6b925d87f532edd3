"""The guest builder: archive format, module order, and the cache's promises (reuse,
rebuild on change, no half-built cache after a kill, two builders at once, permissions
qemu can read). Uses the real Debian packages; no VM is booted here.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from . import build, debs
from .kmod import ModuleTree
from .newc import Archive

pytestmark = [
    pytest.mark.timeout(240),
    # tmp_path is private (0700); the builder rightly warns that qemu could not read it.
    pytest.mark.filterwarnings("ignore:.*not traversable by other users"),
]

BUILD_SCRIPT = Path(build.__file__)


def _need_apt() -> None:
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        pytest.skip("needs Debian's apt-get and dpkg-deb")


@pytest.fixture(scope="module")
def shared_image() -> build.GuestImage:
    """The normal cache; building it once also fetches the packages the other tests copy."""
    _need_apt()
    return build.ensure_guest()


@pytest.fixture
def cache(tmp_path: Path, shared_image: build.GuestImage) -> Path:
    """An empty cache that already holds the downloaded packages (no network needed)."""
    root = tmp_path / "cache"
    shutil.copytree(shared_image.dir.parent / "debs", root / "debs")
    return root


def _cpio_listing(blob: bytes) -> list[str]:
    proc = subprocess.run(["cpio", "-itv", "--quiet"], input=blob, capture_output=True,
                          check=True)
    return proc.stdout.decode().splitlines()


def _builder(cache: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, str(BUILD_SCRIPT), "--out", str(cache)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        umask=0o077,  # the cache's permissions must not depend on the caller's umask
    )


def test_archive_is_read_by_gnu_cpio() -> None:
    archive = Archive()
    archive.add_file("/etc/motd", b"hello\n")
    archive.add_symlink("/bin/sh", "busybox")
    archive.add_char_device("/dev/console", 5, 1)
    archive.add_dir("/tmp", 0o1777)
    lines = _cpio_listing(archive.to_cpio())
    by_name = {line.split()[-1] if "->" not in line else line.split()[-3]: line
               for line in lines}
    assert list(by_name) == ["bin", "bin/sh", "dev", "dev/console", "etc", "etc/motd", "tmp"]
    assert by_name["etc/motd"].startswith("-rw-r--r--   1 root     root            6 ")
    assert by_name["bin/sh"].startswith("lrwxrwxrwx") and by_name["bin/sh"].endswith(
        "bin/sh -> busybox")
    assert by_name["dev/console"].startswith("crw-------") and " 5,   1 " in by_name[
        "dev/console"]
    assert by_name["tmp"].startswith("drwxrwxrwt")


def test_archive_rejects_paths_that_escape() -> None:
    with pytest.raises(ValueError):
        Archive().add_file("/etc/../../x", b"")
    with pytest.raises(ValueError):
        Archive().add_file("relative", b"")


def test_modules_follow_their_dependencies(tmp_path: Path, shared_image: build.GuestImage) -> None:
    kernel_debs = list((shared_image.dir.parent / "debs").glob("linux-image-*.deb"))
    assert len(kernel_debs) == 1
    debs.extract(kernel_debs[0], tmp_path)
    tree = ModuleTree(tmp_path / "lib" / "modules" / shared_image.kernel_version)
    order = [m.name for m in tree.load_order(["virtio_net", "sr_mod", "virtio-rng", "ext4"])]
    assert "ext4" not in order  # built into the cloud kernel
    assert order.index("failover") < order.index("net_failover") < order.index("virtio_net")
    assert order.index("virtio_ring") < order.index("virtio") < order.index("virtio_net")
    assert order.index("cdrom") < order.index("sr_mod")
    assert order.index("scsi_mod") < order.index("sr_mod")
    assert "virtio_rng" in order
    with pytest.raises(LookupError):
        tree.load_order(["no_such_module"])


def test_initrd_holds_the_userland_and_listed_modules(shared_image: build.GuestImage) -> None:
    names = set(subprocess.run(
        ["cpio", "-it", "--quiet"], input=gzip.decompress(shared_image.initrd.read_bytes()),
        capture_output=True, check=True,
    ).stdout.decode().splitlines())
    for needed in ("init", "bin/busybox", "usr/sbin/qemu-ga", "sbin/shutdown",
                   "etc/udhcpc/default.script", "etc/acpi/PWRF/00000080",
                   "lib64/ld-linux-x86-64.so.2", "dev/console"):
        assert needed in names, needed
    manifest = json.loads((shared_image.dir / "manifest.json").read_text())
    kos = {n.rsplit("/", 1)[1].removesuffix(".ko") for n in names if n.endswith(".ko")}
    assert kos == set(manifest["modules"])
    assert shared_image.initrd.stat().st_size < 8 << 20
    assert shared_image.kernel_version in shared_image.kernel.parent.joinpath(
        "manifest.json").read_text()


def test_cache_is_reused_and_rebuilt_when_init_changes(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if os.geteuid() == 0:
        with pytest.warns(UserWarning, match="not traversable"):
            first = build.ensure_guest(cache)  # tmp_path is 0700: qemu could not read it
    else:
        first = build.ensure_guest(cache)
    built_at = json.loads((first.dir / "manifest.json").read_text())["built_at"]
    again = build.ensure_guest(cache)
    assert again == first
    assert json.loads((again.dir / "manifest.json").read_text())["built_at"] == built_at

    rootfs = tmp_path / "rootfs"
    shutil.copytree(build.ROOTFS, rootfs)
    with (rootfs / "init").open("a") as f:
        f.write("# changed\n")
    monkeypatch.setattr(build, "ROOTFS", rootfs)
    changed = build.ensure_guest(cache)
    assert changed.dir != first.dir
    assert b"# changed" in gzip.decompress(changed.initrd.read_bytes())
    assert first.dir.exists()  # used a moment ago: another checkout may still boot it

    hour_ago = time.time() - build.PRUNE_AFTER_SECONDS - 60
    os.utime(first.dir / "manifest.json", (hour_ago, hour_ago))
    build.ensure_guest(cache, rebuild=True)
    assert not first.dir.exists()  # unused for over an hour: removed after the next build
    assert changed.dir.exists()


def test_two_builders_at_once_share_one_result_readable_by_qemu(cache: Path) -> None:
    procs = [_builder(cache), _builder(cache)]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err.decode()
        results.append(json.loads(out))
    assert results[0]["dir"] == results[1]["dir"]
    entries = sorted(p.name for p in cache.iterdir())
    assert entries == sorted([".lock", "debs", Path(results[0]["dir"]).name])
    image_dir = Path(results[0]["dir"])
    for path in (cache, image_dir):
        assert stat.S_IMODE(path.stat().st_mode) == 0o755
    for path in image_dir.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path


def test_killed_build_leaves_no_half_cache(cache: Path) -> None:
    proc = _builder(cache)
    deadline = time.monotonic() + 60
    while not list(cache.glob(".build-*")) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # well inside unpacking the 27 MB kernel package
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert list(cache.glob(".build-*")), "the build was not caught in progress"
    assert sorted(p.name for p in cache.iterdir() if not p.name.startswith(".")) == ["debs"]

    image = build.ensure_guest(cache)  # cleans up after the killed build
    assert not list(cache.glob(".build-*"))
    assert {p.name for p in image.dir.iterdir()} == {"manifest.json", "vmlinuz", "initrd.img"}
