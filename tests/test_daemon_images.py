"""Images through the daemon on the real libvirtd: cache, overlays, progress, and clean failures."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import libvirt
import pytest

from tests.agent_harness import instance_event, running_agent, vm_instance
from tests.libvirtd_fixtures import SYSTEM_URI, TEST_ROOT, host_dirs, system_conn  # noqa: F401 (fixtures)

pytestmark = [pytest.mark.libvirtd, pytest.mark.timeout(300)]


def make_qcow2(path: Path, size: str = "64M", backing: str | None = None) -> str:
    args = ["qemu-img", "create", "-q", "-f", "qcow2"]
    if backing:
        args += ["-b", backing, "-F", "raw"]
    subprocess.run([*args, str(path), size], check=True)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def pool_files(state_dir: Path) -> set[str]:
    pool = state_dir / "pool"
    return {str(p.relative_to(pool)) for p in pool.rglob("*") if p.is_file()} if pool.exists() else set()


def error_message(reply: dict) -> str:
    assert reply.get("transitioning") == "error", reply
    return reply["transitioningMessage"]


async def test_image_cache_overlays_and_failures(tmp_path, system_conn, host_dirs):
    images = Path(host_dirs["state_dir"]).parent / "images"
    images.mkdir(parents=True)
    digest = make_qcow2(images / "base.qcow2")
    url = f"file://{images}/base.qcow2#sha256={digest}"
    state = Path(host_dirs["state_dir"])
    async with running_agent(tmp_path, uri=SYSTEM_URI, **host_dirs) as (ctl, _):
        # storage.image.activate: cached with progress replies
        reply = await ctl.request("storage.image.activate",
                                  {"imageStoragePoolMap": {"image": {"uuid": "img1", "url": url.split("#")[0], "checksum": digest}}},
                                  resource_type="imageStoragePoolMap", resource_id="ispm1")
        assert reply.get("transitioning") is None, reply.get("transitioningMessage")
        assert reply["data"]["imageStoragePoolMap"]["format"] == "qcow2"
        assert reply["data"]["imageStoragePoolMap"]["virtualSizeMb"] == 64
        assert any(r.get("transitioning") == "yes" for r in ctl.progress_replies(reply["name"]))

        # two VMs from the same image: one cached base, two overlays on it
        a = vm_instance("img-a", imageUuid=url, disks=[{"name": "root", "root": True, "size": "128m"}], startOnCreate=False)
        b = vm_instance("img-b", imageUuid=url, disks=[{"name": "root", "root": True, "size": "128m"}], startOnCreate=False)
        for inst in (a, b):
            reply = await instance_event(ctl, "activate", inst)
            assert reply.get("transitioning") is None, reply.get("transitioningMessage")
        pool = system_conn.storagePoolLookupByName(host_dirs["storage_pool"])
        names = {v.name() for v in pool.listAllVolumes(0)}
        bases = {n for n in names if n.startswith("image-")}
        assert len(bases) == 1
        for inst in (a, b):
            vol = pool.storageVolLookupByName(f"{inst['uuid']}-root.qcow2")
            info = subprocess.run(["qemu-img", "info", "--output=json", "-U", vol.path()], capture_output=True, text=True, check=True).stdout
            assert pool.storageVolLookupByName(next(iter(bases))).path() in info
            assert vol.info()[1] == 128 << 20
        # purge leaves the base (shared cache) and nothing of the VM
        before = pool_files(state)
        await instance_event(ctl, "purge", a)
        after = pool_files(state)
        assert before - after == {f"{a['uuid']}-root.qcow2"}
        assert not (state / "seeds" / f"{a['uuid']}.iso").exists()

        # failures: clear error, nothing left behind
        files_before = pool_files(state)
        seeds_before = set((state / "seeds").iterdir())
        bad_sum = vm_instance("bad-sum", imageUuid=f"file://{images}/base.qcow2#sha256={'0' * 64}")
        assert "checksum" in error_message(await instance_event(ctl, "activate", bad_sum)).lower()
        unreachable = vm_instance("unreach", imageUuid="http://127.0.0.1:9/none.qcow2")
        assert "127.0.0.1:9" in error_message(await instance_event(ctl, "activate", unreachable))
        make_qcow2(images / "evil.qcow2", backing="/etc/passwd")
        evil = vm_instance("evil", imageUuid=f"file://{images}/evil.qcow2")
        assert "backing" in error_message(await instance_event(ctl, "activate", evil)).lower()
        huge = vm_instance("huge", imageUuid=url, disks=[{"name": "root", "root": True, "size": "60t"}])
        assert "do not fit" in error_message(await instance_event(ctl, "activate", huge))
        huge_data = vm_instance("huge2", disks=[{"name": "data", "size": "60t"}])
        assert "do not fit" in error_message(await instance_event(ctl, "activate", huge_data))
        refused = {inst["uuid"] for inst in (bad_sum, unreachable, evil, huge, huge_data)}
        assert not refused & {d.UUIDString() for d in system_conn.listAllDomains(0)}
        assert pool_files(state) == files_before
        assert set((state / "seeds").iterdir()) == seeds_before
        await instance_event(ctl, "purge", b)
