"""What a domain needs on disk before it is defined: its volumes and its cloud-init seed.

Everything created here for a VM is recorded so that a failure half-way can be undone: a VM
either comes up whole or leaves nothing behind. Purge finds a VM's files by name alone
(the instance uuid), so it works after the domain is gone.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import libvirt

from agent.spec.vm import VirtualMachine
from drivers.base import DriverError, Placement
from drivers.libvirt import storage
from drivers.libvirt.domxml.configurators.network import macs_for
from drivers.libvirt.domxml.inputs import HostPolicy, KernelBoot, RenderInput
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


class Provisioner:
    def __init__(self, policy: HostPolicy, *, logger: logging.Logger | None = None) -> None:
        self.policy = policy
        self._log = logger or logging.getLogger("herdsman.provision")

    @property
    def pool_path(self) -> Path:
        return self.policy.layout.state_dir / "pool"

    async def kernel_boot(self, conn: libvirt.virConnect, spec: VirtualMachine, placement: Placement) -> KernelBoot | None:
        if spec.image is None:
            return None
        raise DriverError("imageUuid: this agent cannot fetch boot images yet; create the VM without imageUuid")

    async def prepare(self, conn: libvirt.virConnect, inp: RenderInput, *, new_domain: bool) -> Prepared:
        done = Prepared(new_domain=new_domain)
        try:
            storage.ensure_pool(conn, self.policy.layout.storage_pool, self.pool_path)
            for disk in inp.spec.ordered_disks:
                pool = storage.lookup_pool(conn, inp.disk_pool(disk))
                fmt = "qcow2" if disk.root else disk.opts.format
                name = inp.layout.volume_name(inp.uuid, disk.name, fmt)
                vol, created = storage.ensure_volume(pool, name, disk.size_bytes, fmt)
                if created:
                    done.volumes.append(vol)
            # virtlogd (root) writes the console log but does not create its folder
            inp.layout.console_log_path(inp.uuid).parent.mkdir(mode=0o750, parents=True, exist_ok=True)
            seed_path = inp.layout.seed_path(inp.uuid)
            existed = seed_path.exists()
            seed_path.parent.mkdir(mode=0o711, parents=True, exist_ok=True)
            write_seed(seed_path, seed_inputs(inp))
            if not existed:
                done.seed = seed_path
        except libvirt.libvirtError as exc:
            self.undo(conn, done)
            raise DriverError(f"libvirt: {exc.get_error_message() or exc}") from None
        except BaseException:
            self.undo(conn, done)
            raise
        return done

    def undo(self, conn: libvirt.virConnect, done: Prepared) -> None:
        """Delete what `prepare` created for a VM that is not going to exist."""
        if not done.new_domain:
            return
        for vol in done.volumes:
            try:
                vol.delete(0)
            except libvirt.libvirtError as exc:
                self._log.warning("could not delete volume after a failed create", extra={"volume": vol.name(), "error": str(exc)})
        if done.seed is not None:
            done.seed.unlink(missing_ok=True)

    def purge(self, conn: libvirt.virConnect, instance_uuid: str) -> list[str]:
        """Delete the VM's volumes in every active pool, its seed and its console logs."""
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
