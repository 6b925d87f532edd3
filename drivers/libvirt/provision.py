"""What a domain needs on disk before it is defined: its volumes and its cloud-init seed.

Everything created here for a VM is recorded so that a failure half-way can be undone: a VM
either comes up whole or leaves nothing behind. Purge finds a VM's files by name alone
(the instance uuid), so it works after the domain is gone.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import libvirt

from agent.spec.image import ImageRef, parse_checksum, parse_image_ref
from agent.spec.vm import VirtualMachine
from drivers.base import DriverError, Placement
from drivers.libvirt import storage, threads
from drivers.libvirt.domxml.configurators.network import macs_for
from drivers.libvirt.domxml.inputs import HostPolicy, KernelBoot, RenderInput
from drivers.libvirt.images import ImageCache, ProgressCallback
from drivers.libvirt.seed import SeedInputs, write_seed


@dataclass
class Prepared:
    new_domain: bool
    volumes: list[libvirt.virStorageVol] = field(default_factory=list)
    seed: Path | None = None  # set when this call wrote a seed where there was none


def seed_inputs(inp: RenderInput) -> SeedInputs:
    spec = inp.spec
    return SeedInputs(
        instance_id=inp.uuid,
        hostname=spec.hostname,
        domain_name=spec.domain_name,
        userdata=spec.userdata,
        dns=tuple(spec.dns),
        dns_search=tuple(spec.dns_search),
        extra_hosts=tuple(spec.extra_host_pairs),
        macs=() if spec.network_mode == "none" else macs_for(inp)[: 1 if inp.profile.session else None],
    )


def placement_checksum(placement: Placement) -> str | None:
    """The checksum of the event's image object (Cattle sends a bare hex digest)."""
    raw = (placement.image or {}).get("checksum")
    if not raw:
        return None
    try:
        return parse_checksum(str(raw))
    except ValueError as exc:
        raise DriverError(f"image.checksum: {exc}") from None


class Provisioner:
    def __init__(self, policy: HostPolicy, *, logger: logging.Logger | None = None) -> None:
        self.policy = policy
        self._log = logger or logging.getLogger("herdsman.provision")
        self.images = ImageCache(policy.layout, pool_path=self.pool_path, logger=self._log)

    @property
    def pool_path(self) -> Path:
        return self.policy.layout.state_dir / "pool"

    async def kernel_boot(self, conn: libvirt.virConnect, spec: VirtualMachine, placement: Placement) -> KernelBoot | None:
        ref = spec.image
        if ref is None or ref.kind != "kernel":
            return None
        return await self.images.ensure_kernel_image(conn, ref, checksum=placement_checksum(placement),
                                                     progress=self._progress(ref))

    def _progress(self, ref: ImageRef) -> ProgressCallback:
        async def report(percent: int, message: str) -> None:
            self._log.info(f"image {percent:3d}% {message}", extra={"image": ref.url.split("?")[0], "percent": percent})
        return report

    async def ensure_image(self, conn: libvirt.virConnect, reference: str, checksum: str | None,
                           progress: ProgressCallback | None = None) -> dict[str, Any]:
        """Fetch an image into the host cache ahead of any VM; the storage.image.activate reply."""
        try:
            ref = parse_image_ref(reference)
        except ValueError as exc:
            raise DriverError(f"image: {exc}") from None
        if ref.kind == "kernel":
            boot = await self.images.ensure_kernel_image(conn, ref, checksum=checksum, progress=progress)
            return {"format": "kernel", "+data": {"herdsman": {"kernel": boot.kernel, "initrd": boot.initrd}}}
        base = await self.images.ensure_disk_image(conn, ref, checksum=checksum, progress=progress)
        return {"format": base.format, "virtualSizeMb": base.virtual_size >> 20,
                "+data": {"herdsman": {"volume": base.volume_name}}}

    async def prepare(self, conn: libvirt.virConnect, inp: RenderInput, placement: Placement, *,
                      new_domain: bool) -> Prepared:
        """Volumes and seed for `inp`; libvirt and file work on worker threads, never the loop."""
        done = Prepared(new_domain=new_domain)
        try:
            await threads.call(storage.ensure_pool, conn, self.policy.layout.storage_pool, self.pool_path)
            image = inp.spec.image
            for disk in inp.spec.ordered_disks:
                fmt = "qcow2" if disk.root and image is not None else disk.opts.format
                name = inp.layout.volume_name(inp.uuid, disk.name, fmt)
                if disk.root and image is not None and image.kind == "disk":
                    pool, existing = await threads.call(self._pool_and_volume, conn, inp.disk_pool(disk), name)
                    if existing is None:
                        base = await self.images.ensure_disk_image(
                            conn, image, checksum=placement_checksum(placement), progress=self._progress(image))
                        done.volumes.append(await threads.call(self.images.create_overlay, pool, name, base,
                                                               disk.size_bytes))
                    continue
                vol, created = await threads.call(self._blank_volume, conn, inp.disk_pool(disk), name,
                                                  disk.size_bytes, fmt)
                if created:
                    done.volumes.append(vol)
            seed_path = inp.layout.seed_path(inp.uuid)
            existed = seed_path.exists()
            # file I/O with fsyncs: off the loop thread
            await asyncio.to_thread(self._write_files, inp, seed_path)
            if not existed:
                done.seed = seed_path
        except libvirt.libvirtError as exc:
            await self.undo(conn, done)
            raise DriverError(f"libvirt: {exc.get_error_message() or exc}") from None
        except BaseException:
            await asyncio.shield(self.undo(conn, done))
            raise
        return done

    @staticmethod
    def _pool_and_volume(conn: libvirt.virConnect, pool_name: str,
                         name: str) -> tuple[libvirt.virStoragePool, libvirt.virStorageVol | None]:
        pool = storage.lookup_pool(conn, pool_name)
        return pool, storage.find_volume(pool, name)

    @staticmethod
    def _blank_volume(conn: libvirt.virConnect, pool_name: str, name: str, size: int,
                      fmt: str) -> tuple[libvirt.virStorageVol, bool]:
        return storage.ensure_volume(storage.lookup_pool(conn, pool_name), name, size, fmt)

    @staticmethod
    def _write_files(inp: RenderInput, seed_path: Path) -> None:
        # virtlogd (root) writes the console log but does not create its folder
        inp.layout.console_log_path(inp.uuid).parent.mkdir(mode=0o750, parents=True, exist_ok=True)
        seed_path.parent.mkdir(mode=0o711, parents=True, exist_ok=True)
        write_seed(seed_path, seed_inputs(inp))

    async def undo(self, conn: libvirt.virConnect, done: Prepared) -> None:
        """Delete what `prepare` created for a VM that is not going to exist."""
        if done.new_domain:
            await threads.call(self._undo_now, done)

    def _undo_now(self, done: Prepared) -> None:
        for vol in done.volumes:
            try:
                vol.delete(0)
            except libvirt.libvirtError as exc:
                self._log.warning("could not delete volume after a failed create", extra={"volume": vol.name(), "error": str(exc)})
        if done.seed is not None:
            done.seed.unlink(missing_ok=True)

    def purge(self, conn: libvirt.virConnect, instance_uuid: str) -> list[str]:
        """Delete the VM's volumes in every active pool, its seed and its console logs
        (blocking: a worker thread's job)."""
        pools = {p.name() for p in conn.listAllStoragePools(libvirt.VIR_CONNECT_LIST_STORAGE_POOLS_ACTIVE)}
        removed = storage.delete_volumes(conn, pools, f"{instance_uuid}-")
        layout = self.policy.layout
        seed = layout.seed_path(instance_uuid)
        log = layout.console_log_path(instance_uuid)
        for path in [seed, *sorted(log.parent.glob(f"{log.name}*"))] if log.parent.exists() else [seed]:
            if path.exists():
                path.unlink()
                removed.append(str(path))
        return removed
