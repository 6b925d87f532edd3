"""Shared set-up for tests against the real libvirtd (qemu:///system, as root)."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Iterator

import libvirt
import pytest

SYSTEM_URI = "qemu:///system"
#: Under qemu:///system qemu runs as libvirt-qemu: seeds and volumes must sit in folders it can
#: traverse, which pytest's 0700 tmp dirs are not.
TEST_ROOT = Path("/var/lib/herdsman-tests")


def libvirtd_up() -> bool:
    """Whether this process can reach the real libvirtd (root and the system socket)."""
    if os.geteuid() != 0 or not os.path.exists("/run/libvirt/libvirt-sock"):
        return False
    try:
        libvirt.open(SYSTEM_URI).close()
    except libvirt.libvirtError:
        return False
    return True


needs_libvirtd = pytest.mark.skipif(not libvirtd_up(), reason="needs libvirtd (qemu:///system)")


def system_connection() -> libvirt.virConnect:
    if os.geteuid() != 0:
        pytest.skip("needs root for qemu:///system (run scripts/test as root, as CI does)")
    try:
        return libvirt.open(SYSTEM_URI)
    except libvirt.libvirtError as exc:
        pytest.skip(f"libvirtd is not running ({exc}); scripts/libvirt-up starts it")


@pytest.fixture
def system_conn() -> Iterator[libvirt.virConnect]:
    conn = system_connection()
    yield conn
    conn.close()


def new_test_root() -> tuple[str, Path]:
    """(token, folder): a fresh folder under TEST_ROOT that qemu can traverse, and a token to
    name the test's pool, ports table and the like after."""
    token = uuid.uuid4().hex[:8]
    root = TEST_ROOT / token
    root.mkdir(parents=True, mode=0o755)
    os.chmod(TEST_ROOT, 0o755)
    return token, root


@pytest.fixture
def host_dirs(system_conn: libvirt.virConnect) -> Iterator[dict[str, object]]:
    """A private state dir, log dir and storage pool name; everything removed afterwards."""
    token, root = new_test_root()
    pool = f"hmtest-{token}"
    yield {"state_dir": root / "state", "log_dir": root / "log", "storage_pool": pool}
    cleanup_test_host(system_conn, root, pool)


def cleanup_test_host(conn: libvirt.virConnect, root: Path, pool: str) -> None:
    """Destroy and undefine every domain whose XML mentions `root`, delete the pool, remove `root`."""
    for dom in conn.listAllDomains(0):
        try:
            ours = str(root) in dom.XMLDesc(0)
        except libvirt.libvirtError:
            continue
        if ours:
            if dom.isActive():
                dom.destroy()
            dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)
    remove_pool(conn, pool)
    shutil.rmtree(root, ignore_errors=True)


def remove_pool(conn: libvirt.virConnect, name: str) -> None:
    """Delete a test's storage pool with its volumes, if it is there."""
    try:
        p = conn.storagePoolLookupByName(name)
        for vol in p.listAllVolumes(0):
            vol.delete(0)
        if p.isActive():
            p.destroy()
        p.undefine()
    except libvirt.libvirtError:
        pass
