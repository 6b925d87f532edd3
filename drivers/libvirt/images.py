"""The boot-image cache: each image is fetched once per host and shared by every VM using it.

Disk images (``file://`` or ``http(s)://`` qcow2/raw, optionally ``.gz``/``.xz``) become
read-only volumes ``image-<key>.<qcow2|raw>`` in the agent's storage pool; a VM's root disk
is a copy-on-write qcow2 overlay on one (`ImageCache.create_overlay`). `<key>` is a digest of
the URL and of the pinned checksum, if any: a new checksum for the same URL is a new image,
never a silently reused old one. Nothing a user wrote becomes a file name.

Kernel images (``kernel:<url of manifest.json>``) boot a kernel directly. The manifest::

    {
      "kernel":  "vmlinuz",                  # required: URL, or a path relative to the manifest
      "initrd":  "initrd.img",               # optional, same rules
      "cmdline": "console=ttyS0 quiet",      # optional, default "console=ttyS0"
      "checksums": {"kernel": "sha256:<hex>", "initrd": "sha256:<hex>"}   # optional
    }

Unknown keys are refused. A checksum is ``<md5|sha1|sha256|sha512>:<hex>`` or bare hex; a
``#sha256=<hex>`` fragment on a file's URL works too. A manifest fetched over http(s) may
only name http(s) files (it must not make the agent read host files). Files are not
decompressed: qemu loads the kernel as is and the kernel unpacks its own initrd. Kernel and
initrd land as ``kernel`` and ``initrd`` (0644, directory 0755, readable by qemu's user) in
``HostLayout.kernel_dir``, next to the validated ``manifest.json``; the directory appears by
one rename, so it is either complete or absent.

Concurrency: every image has at most one download in flight; callers asking for it meanwhile
share the result or the failure (failures are not cached). The download is cancelled only
when every caller waiting for it is. libvirt calls run on libvirt worker threads
(drivers.libvirt.threads), never on the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import libvirt

from agent.spec.image import ImageRef, parse_checksum
from drivers.libvirt import storage, threads
from drivers.libvirt.domxml.inputs import KernelBoot
from drivers.libvirt.images_fetch import (
    ImageError,
    ProgressCallback,
    display_url,
    fetch,
    fetch_small,
    inspect_image,
)
from drivers.libvirt.images_kernel import (
    MANIFEST_LIMIT,
    KernelManifest,
    commit_kernel_dir,
    make_staging,
    parse_manifest,
    read_kernel_dir,
    resolve_member,
    sweep_staging,
)
from drivers.libvirt.layout import HostLayout

__all__ = ["BaseImage", "ImageCache", "ImageError", "KernelManifest", "ProgressCallback"]


@dataclass(frozen=True)
class BaseImage:
    """A cached disk image: a read-only volume in the agent's pool."""

    volume_name: str
    path: str
    format: Literal["qcow2", "raw"]
    virtual_size: int


# -- single flight -----------------------------------------------------------------------


@dataclass(eq=False)
class _Flight:
    key: str
    log: logging.Logger
    listeners: list[ProgressCallback] = field(default_factory=list)
    waiters: int = 0
    task: asyncio.Task[Any] | None = None

    async def report(self, percent: int, message: str) -> None:
        for listener in list(self.listeners):
            try:
                await listener(percent, message)
            except Exception as exc:  # noqa: BLE001 - a lost progress reply must not fail the download
                self.log.warning("progress report failed", extra={"error": str(exc)})


class ImageCache:
    def __init__(
        self,
        layout: HostLayout,
        *,
        pool_path: Path,
        logger: logging.Logger | None = None,
        download_timeout: float = 600,
    ) -> None:
        self.layout = layout
        self.pool_path = Path(pool_path)
        self.download_timeout = download_timeout
        self._log = logger or logging.getLogger("herdsman.images")
        self._flights: dict[str, _Flight] = {}
        self._swept = False
        #: ("disk" or "kernel", "hit" or "miss") → requests since start; a miss fetches or joins a fetch
        self.lookups: Counter[tuple[str, str]] = Counter()

    @property
    def work_dir(self) -> Path:
        return self.pool_path / ".work"

    # -- disk images ----------------------------------------------------------------------

    async def ensure_disk_image(
        self,
        conn: libvirt.virConnect,
        ref: ImageRef,
        *,
        checksum: str | None = None,
        progress: ProgressCallback | None = None,
    ) -> BaseImage:
        """The cached base image for `ref`, downloading and verifying it on first use."""
        if ref.kind != "disk":
            raise ImageError(f"image {display_url(ref.url)}: a {ref.kind} image is not a disk image")
        digest = self._checksum(ref, checksum)
        key = self.layout.image_key(self._key_text(ref.url, digest))
        flight = self._flights.get(f"disk:{key}")
        if flight is None:
            try:
                found = await threads.call(self._find_cached, conn, key)
            except libvirt.libvirtError as exc:
                raise ImageError(f"image {display_url(ref.url)}: libvirt: {exc.get_error_message()}") from None
            self.lookups["disk", "hit" if found is not None else "miss"] += 1
            if found is not None:
                return found
            flight = self._flights.get(f"disk:{key}")  # re-read: one may have started meanwhile
            if flight is None:
                flight = self._start(f"disk:{key}", lambda f: self._download_disk(conn, ref, digest, key, f))
        else:
            self.lookups["disk", "miss"] += 1
        return await self._join(flight, progress)

    def _find_cached(self, conn: libvirt.virConnect, key: str, create_pool: bool = True) -> BaseImage | None:
        """The cached image with this key, if the pool has it (blocking: a worker thread's job)."""
        if create_pool:
            pool = storage.ensure_pool(conn, self.layout.storage_pool, self.pool_path)
        else:
            pool = storage.lookup_pool(conn, self.layout.storage_pool)
        return self._lookup(pool, key, refresh=True)

    def _lookup(self, pool: libvirt.virStoragePool, key: str, *, refresh: bool) -> BaseImage | None:
        for attempt in (False, True) if refresh else (False,):
            if attempt:
                pool.refresh(0)
            for fmt in ("qcow2", "raw"):
                name = f"image-{key}.{fmt}"
                try:
                    vol = pool.storageVolLookupByName(name)
                except libvirt.libvirtError:
                    continue
                return BaseImage(volume_name=name, path=vol.path(), format=fmt, virtual_size=vol.info()[1])  # type: ignore[arg-type]
        return None

    async def _download_disk(
        self, conn: libvirt.virConnect, ref: ImageRef, digest: str | None, key: str, flight: _Flight
    ) -> BaseImage:
        shown = display_url(ref.url)
        if digest is None:
            self._log.warning("image has no checksum; it is used unverified", extra={"image": shown})
        await asyncio.to_thread(self._prepare_work_dir)
        # created here, not in a thread: a cancellation must not lose track of the file
        fd, tmp_name = tempfile.mkstemp(dir=self.work_dir, prefix=f"{key}-", suffix=".part")
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out:
                await fetch(ref.url, out, checksum=digest, timeout=self.download_timeout, progress=flight.report)
                await asyncio.to_thread(os.fsync, out.fileno())
            fmt, size = await inspect_image(tmp, shown)
            name = f"image-{key}.{fmt}"
            await asyncio.to_thread(_install, tmp, self.pool_path / name, shown)
        finally:
            tmp.unlink(missing_ok=True)  # never a partial file: also on error and cancellation
        try:
            found = await threads.call(self._find_cached, conn, key, False)
        except libvirt.libvirtError as exc:
            raise ImageError(f"image {shown}: libvirt: {exc.get_error_message()}") from None
        if found is None:
            raise ImageError(f"image {shown}: stored in {self.pool_path} but pool "
                             f"{self.layout.storage_pool!r} does not list it (is the pool elsewhere?)")
        self._log.info("image cached", extra={"image": shown, "volume": found.volume_name, "format": fmt})
        return BaseImage(volume_name=found.volume_name, path=found.path, format=fmt, virtual_size=size)

    def create_overlay(
        self, pool: libvirt.virStoragePool, name: str, base: BaseImage, size: int
    ) -> libvirt.virStorageVol:
        """A copy-on-write qcow2 volume of `size` bytes on top of `base`, made by libvirt
        (blocking: call it through drivers.libvirt.threads.call).

        Refused when `size` is below the image's virtual size (the guest's partitions would
        end past the disk) or when the pool could never hold `size` bytes.
        """
        if size < base.virtual_size:
            raise ImageError(
                f"disk {name}: {size} bytes is smaller than its image {base.volume_name} "
                f"({base.virtual_size} bytes); a disk cannot be smaller than its image"
            )
        storage.check_free_space(pool, size, name)
        xml = storage.volume_xml(name, size, "qcow2", backing=(base.path, base.format))
        try:
            return pool.createXML(xml, 0)
        except libvirt.libvirtError as exc:
            raise ImageError(f"disk {name}: cannot create an overlay on {base.volume_name}: "
                             f"{exc.get_error_message()}") from None

    # -- kernel images --------------------------------------------------------------------

    async def ensure_kernel_image(
        self,
        conn: libvirt.virConnect,
        ref: ImageRef,
        *,
        checksum: str | None = None,
        progress: ProgressCallback | None = None,
    ) -> KernelBoot:
        """Kernel, initrd and command line of a `kernel:` image, fetched on first use."""
        if ref.kind != "kernel":
            raise ImageError(f"image {display_url(ref.url)}: a disk image is not a kernel manifest")
        digest = self._checksum(ref, checksum)
        target = self.layout.kernel_dir(self._key_text(ref.url, digest))
        flight_key = f"kernel:{target.name}"
        if flight_key not in self._flights:
            boot = await asyncio.to_thread(read_kernel_dir, target, display_url(ref.url))
            if boot is not None:
                self.lookups["kernel", "hit"] += 1
                return boot
        self.lookups["kernel", "miss"] += 1
        flight = self._flights.get(flight_key)  # re-read: one may have started meanwhile
        if flight is None:
            flight = self._start(flight_key, lambda f: self._download_kernel(ref, digest, target, f))
        return await self._join(flight, progress)

    async def _download_kernel(self, ref: ImageRef, digest: str | None, target: Path, flight: _Flight) -> KernelBoot:
        shown = display_url(ref.url)
        if digest is None:
            self._log.warning("kernel manifest has no checksum; it is used unverified", extra={"image": shown})
        raw = await fetch_small(ref.url, checksum=digest, timeout=self.download_timeout, limit=MANIFEST_LIMIT)
        manifest = parse_manifest(raw, shown)
        members = [("kernel", resolve_member(ref.url, manifest.kernel, manifest.checksums.kernel, shown))]
        if manifest.initrd:
            members.append(("initrd", resolve_member(ref.url, manifest.initrd, manifest.checksums.initrd, shown)))
        await asyncio.to_thread(sweep_staging, target.parent, time.time() - 2 * self.download_timeout)
        staging = make_staging(target.parent)
        try:
            share = 100 // len(members)
            for i, (name, member) in enumerate(members):
                if member.checksum is None:
                    self._log.warning("kernel image file has no checksum", extra={"image": display_url(member.url)})
                report = _scaled(flight.report, i * share, (i + 1) * share)
                out = open(staging / name, "xb")  # noqa: ASYNC230,SIM115 - a new name in our fresh directory
                try:
                    await fetch(member.url, out, checksum=member.checksum, timeout=self.download_timeout,
                                progress=report, decompress=False, label=f"{name} of {shown}")
                    await asyncio.to_thread(os.fsync, out.fileno())
                finally:
                    out.close()
            await asyncio.to_thread(commit_kernel_dir, staging, target, manifest)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        boot = await asyncio.to_thread(read_kernel_dir, target, shown)
        assert boot is not None
        return boot

    def cached_bytes(self) -> int:
        """Disk space the cached images use (blocks allocated, so sparse raw images count what
        they really take). Reads directories: call it off the event loop."""
        files = list(self.pool_path.glob("image-*"))
        kernels = self.layout.state_dir / "kernels"
        if kernels.is_dir():
            files += [f for d in kernels.iterdir() if d.is_dir() and not d.name.startswith(".") for f in d.iterdir()]
        total = 0
        for path in files:
            try:
                total += path.lstat().st_blocks * 512
            except OSError:  # removed while we looked
                pass
        return total

    # -- shared machinery -----------------------------------------------------------------

    def _checksum(self, ref: ImageRef, checksum: str | None) -> str | None:
        """The argument's checksum (the controller's `image.checksum`), else the URL fragment's."""
        try:
            given = parse_checksum(checksum) if checksum else None
        except ValueError as exc:
            raise ImageError(f"image {display_url(ref.url)}: {exc}") from None
        if given and ref.checksum and given.split(":")[0] == ref.checksum.split(":")[0] and given != ref.checksum:
            raise ImageError(f"image {display_url(ref.url)}: the image's checksum {given} contradicts "
                             f"the URL's {ref.checksum}")
        return given or ref.checksum

    @staticmethod
    def _key_text(url: str, digest: str | None) -> str:
        return url if digest is None else f"{url}#{digest}"

    def _start(self, key: str, work: Any) -> _Flight:
        flight = _Flight(key=key, log=self._log)
        flight.task = asyncio.get_running_loop().create_task(work(flight), name=f"image {key}")
        flight.task.add_done_callback(lambda t: self._finished(flight, t))
        self._flights[key] = flight
        return flight

    def _finished(self, flight: _Flight, task: asyncio.Task[Any]) -> None:
        if self._flights.get(flight.key) is flight:
            del self._flights[flight.key]
        if not task.cancelled():
            task.exception()  # delivered to the waiters; marks it retrieved when there are none

    async def _join(self, flight: _Flight, progress: ProgressCallback | None) -> Any:
        assert flight.task is not None
        if progress is not None:
            flight.listeners.append(progress)
        flight.waiters += 1
        try:
            return await asyncio.shield(flight.task)
        except asyncio.CancelledError:
            if flight.waiters == 1 and not flight.task.done():
                # the last one waiting gave up: stop the download and let it delete its files
                if self._flights.get(flight.key) is flight:
                    del self._flights[flight.key]
                flight.task.cancel()
                await asyncio.wait([flight.task])
            raise
        finally:
            flight.waiters -= 1
            if progress is not None:
                flight.listeners.remove(progress)

    def _prepare_work_dir(self) -> None:
        """Create `.work`; once per process, delete what a killed agent left there."""
        self.work_dir.mkdir(mode=0o700, exist_ok=True)
        if self._swept:
            return
        self._swept = True
        horizon = time.time() - 2 * self.download_timeout
        for entry in self.work_dir.iterdir():
            if entry.name.endswith(".part") and entry.lstat().st_mtime < horizon:
                entry.unlink(missing_ok=True)


def _scaled(report: ProgressCallback, low: int, high: int) -> ProgressCallback:
    async def scaled(percent: int, message: str) -> None:
        await report(low + (high - low) * percent // 100, message)

    return scaled


def _install(tmp: Path, dest: Path, shown: str) -> None:
    """Read-only first, then linked in under its final name (never over an existing file)."""
    os.chmod(tmp, 0o444)
    try:
        os.link(tmp, dest)
    except FileExistsError:
        raise ImageError(f"image {shown}: {dest.name} already exists in the pool directory") from None
