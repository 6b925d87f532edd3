"""Downloading and verifying one boot-image file: fetch, checksum, decompress, inspect.

The checksum is computed over the bytes *as downloaded* (before any decompression), as
Cattle's libvirt plugin did: a published checksum describes the file on the server, so an
`image.qcow2.xz` is pinned by the digest of the `.xz` file.

Blocking work (file reads and writes, hashing, decompression) runs in worker threads so the
event loop keeps serving the controller while gigabytes arrive. Whatever this module writes
goes to a temporary file the caller owns and deletes; nothing here touches libvirt.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import lzma
import os
import stat
import struct
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Literal, Protocol
from urllib.parse import unquote, urlsplit, urlunsplit

import httpx

from agent.spec.image import parse_checksum
from drivers.base import DriverError

ProgressCallback = Callable[[int, str], Awaitable[None]]
ImageFormat = Literal["qcow2", "raw"]

CHUNK = 1 << 20  # file reads (in a thread)
_HTTP_CHUNK = 256 << 10  # joined on the event loop: larger pieces stall it (measured)
_OUT_CHUNK = 4 << 20  # bound on one decompression step's output, so a gzip bomb cannot fill memory
_PROGRESS_STEP = 3  # percent, as Cattle's storage.image.activate replies
_UNKNOWN_SIZE_STEP = 64 << 20  # bytes between progress reports when there is no Content-Length
_QEMU_IMG_TIMEOUT = 60.0


class ImageError(DriverError):
    """A boot image could not be fetched or is unfit; the message names the image URL."""


def display_url(url: str) -> str:
    """The URL without credentials or query string (signed URLs carry tokens there)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "…" if parts.query else "", ""))


# -- checksums and decompression ---------------------------------------------------------


def new_hasher(checksum: str | None) -> tuple[Any, str] | None:
    """(hashlib object, expected hex) for an 'algo:hex' or bare-hex checksum, None for none."""
    if checksum is None:
        return None
    algo, _, digest = parse_checksum(checksum).partition(":")
    return hashlib.new(algo), digest


class _Decompressor(Protocol):
    def feed(self, data: bytes, out: BinaryIO) -> None: ...
    def finish(self) -> None: ...


class _Plain:
    def feed(self, data: bytes, out: BinaryIO) -> None:
        out.write(data)

    def finish(self) -> None:
        pass


class _Gzip:
    """gzip by zlib; output bounded per step (a gzip bomb cannot fill memory), concatenated
    members (`cat a.gz b.gz`) and trailing zero padding accepted, as gzip(1) does."""

    def __init__(self) -> None:
        self._d = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
        self._pending = False

    def feed(self, data: bytes, out: BinaryIO) -> None:
        while data or self._pending:
            if self._d.eof:
                data = data.lstrip(b"\0")
                if not data:
                    return
                self._d = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
            chunk = self._d.decompress(data, _OUT_CHUNK)
            out.write(chunk)
            self._pending = len(chunk) == _OUT_CHUNK and not self._d.eof
            data = self._d.unused_data if self._d.eof else self._d.unconsumed_tail

    def finish(self) -> None:
        if not self._d.eof:
            raise EOFError("the gzip stream ends early (truncated download?)")


class _Xz:
    """xz by lzma, with the same bounds, concatenated streams and zero padding."""

    def __init__(self) -> None:
        self._d = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)

    def feed(self, data: bytes, out: BinaryIO) -> None:
        while data or not self._d.needs_input:
            if self._d.eof:
                data = data.lstrip(b"\0")
                if not data:
                    return
                self._d = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
            out.write(self._d.decompress(data, _OUT_CHUNK))
            data = self._d.unused_data if self._d.eof else b""

    def finish(self) -> None:
        if not self._d.eof:
            raise EOFError("the xz stream ends early (truncated download?)")


def decompressor_for(url: str) -> _Decompressor:
    path = urlsplit(url).path.lower()
    if path.endswith(".gz"):
        return _Gzip()
    if path.endswith(".xz"):
        return _Xz()
    return _Plain()


# -- the download ------------------------------------------------------------------------


@dataclass
class Fetched:
    downloaded: int  # bytes as transferred (what the checksum covers)
    digest: str | None  # "algo:hex" that was verified, None when none was given


class _Sink:
    """Hashes, decompresses and writes chunks in a worker thread, one chunk at a time.

    One chunk is processed while the next is being received: hashing (sha256 runs at about
    the speed of a 1 Gbit/s link) overlaps the network instead of adding to it.
    """

    def __init__(self, out: BinaryIO, checksum: str | None, decompress: _Decompressor) -> None:
        self.out = out
        self.hasher = new_hasher(checksum)
        self.decompress = decompress
        self.downloaded = 0
        self._pending: asyncio.Future[None] | None = None

    def _write(self, chunk: bytes) -> None:
        if self.hasher:
            self.hasher[0].update(chunk)
        self.decompress.feed(chunk, self.out)

    async def push(self, chunk: bytes) -> None:
        await self.drain()
        self.downloaded += len(chunk)
        self._pending = asyncio.ensure_future(asyncio.to_thread(self._write, chunk))

    async def drain(self) -> None:
        """Wait for the chunk in flight (shielded: a thread cannot be interrupted anyway)."""
        if self._pending is not None:
            pending = self._pending
            await asyncio.shield(pending)
            self._pending = None

    async def abandon(self) -> None:
        """On failure: let the thread finish with the file before the caller deletes it."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            await asyncio.wait([pending])
            if not pending.cancelled():
                pending.exception()  # retrieved; the failure being handled is the one to report

    async def close(self) -> None:
        await self.drain()
        await asyncio.to_thread(self.decompress.finish)
        await asyncio.to_thread(self.out.flush)


class _Progress:
    """Turns byte counts into at most one report per few percent."""

    def __init__(self, report: ProgressCallback | None, label: str, total: int | None) -> None:
        self.report, self.label, self.total = report, label, total
        self.last_percent, self.last_bytes = -_PROGRESS_STEP, 0

    async def update(self, done: int) -> None:
        if self.report is None:
            return
        if self.total:
            percent = min(100, done * 100 // self.total)
            if percent - self.last_percent < _PROGRESS_STEP and percent < 100:
                return
            self.last_percent = percent
            await self.report(percent, f"downloading {self.label}: {percent}% of {_mib(self.total)}")
        elif done - self.last_bytes >= _UNKNOWN_SIZE_STEP:
            self.last_bytes = done
            await self.report(0, f"downloading {self.label}: {_mib(done)}")

    async def done(self) -> None:
        if self.report is not None and self.last_percent < 100:
            self.last_percent = 100
            await self.report(100, f"downloaded {self.label}")


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def open_local(url: str) -> BinaryIO:
    """Open a file:// URL for reading; only a regular file (never a FIFO or a device)."""
    path = unquote(urlsplit(url).path)
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise ImageError(f"image {display_url(url)}: not a regular file")
        # O_NONBLOCK: a FIFO swapped in after the check must not block the open
        fd = os.open(path, os.O_RDONLY | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise ImageError(f"image {display_url(url)}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ImageError(f"image {display_url(url)}: not a regular file")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


async def fetch(
    url: str,
    dest: BinaryIO,
    *,
    checksum: str | None,
    timeout: float,
    progress: ProgressCallback | None = None,
    decompress: bool = True,
    label: str | None = None,
) -> Fetched:
    """Copy `url` into `dest` (decompressing by suffix), verify the checksum of what arrived.

    `timeout` bounds the whole transfer; a stalled connection fails sooner (read timeout).
    Raises ImageError naming the URL; `dest` is left for the caller to delete.
    """
    shown = display_url(url)
    sink = _Sink(dest, checksum, decompressor_for(url) if decompress else _Plain())
    try:
        try:
            async with asyncio.timeout(timeout):
                if urlsplit(url).scheme == "file":
                    await _fetch_file(url, sink, _Progress(progress, label or shown, None))
                else:
                    await _fetch_http(url, sink, progress, label or shown, timeout)
                await sink.close()
        except BaseException:
            await sink.abandon()
            raise
    except ImageError:
        raise
    except TimeoutError:
        raise ImageError(f"image {shown}: download did not finish within {timeout:g} s") from None
    except httpx.HTTPStatusError as exc:
        raise ImageError(f"image {shown}: HTTP {exc.response.status_code} {exc.response.reason_phrase}") from None
    except httpx.TimeoutException:
        raise ImageError(f"image {shown}: the server stopped sending (timed out)") from None
    except httpx.TransportError as exc:
        raise ImageError(f"image {shown}: {type(exc).__name__}: {exc or 'connection failed'} "
                         f"after {sink.downloaded} bytes") from None
    except (zlib.error, lzma.LZMAError, EOFError) as exc:
        raise ImageError(f"image {shown}: cannot decompress: {exc}") from None
    except OSError as exc:
        raise ImageError(f"image {shown}: {exc.strerror or exc}") from None
    digest = None
    if sink.hasher is not None:
        hasher, expected = sink.hasher
        if hasher.hexdigest() != expected:
            raise ImageError(
                f"image {shown}: checksum mismatch: expected {hasher.name}:{expected}, "
                f"downloaded {sink.downloaded} bytes with {hasher.name}:{hasher.hexdigest()}"
            )
        digest = f"{hasher.name}:{expected}"
    return Fetched(downloaded=sink.downloaded, digest=digest)


async def _fetch_file(url: str, sink: _Sink, progress: _Progress) -> None:
    src = await asyncio.to_thread(open_local, url)
    try:
        progress.total = os.fstat(src.fileno()).st_size or None
        while chunk := await asyncio.to_thread(src.read, CHUNK):
            await sink.push(chunk)
            await progress.update(sink.downloaded)
    finally:
        src.close()
    await progress.done()


async def _fetch_http(url: str, sink: _Sink, report: ProgressCallback | None, label: str, timeout: float) -> None:
    limits = httpx.Timeout(min(timeout, 60.0), connect=min(timeout, 30.0))
    # identity: the bytes we hash are the file as published, not a transfer encoding of it
    headers = {"Accept-Encoding": "identity", "User-Agent": "herdsman"}
    client = httpx.AsyncClient(follow_redirects=True, timeout=limits, headers=headers)
    async with client, client.stream("GET", url) as resp:
        resp.raise_for_status()
        length = resp.headers.get("content-length")
        total = int(length) if length and length.isdigit() else None
        # a server that compresses anyway: hash the file it decodes to, not the transfer
        encoded = resp.headers.get("content-encoding", "identity").lower() != "identity"
        if encoded:
            total = None
        progress = _Progress(report, label, total)
        chunks = resp.aiter_bytes(_HTTP_CHUNK) if encoded else resp.aiter_raw(_HTTP_CHUNK)
        async for chunk in chunks:
            await sink.push(chunk)
            await progress.update(sink.downloaded)
        await sink.drain()
        if total is not None and sink.downloaded != total:
            raise ImageError(f"image {display_url(url)}: got {sink.downloaded} of {total} bytes")
        await progress.done()


class _Capped(io.BytesIO):
    def __init__(self, url: str, limit: int) -> None:
        super().__init__()
        self.url, self.limit = url, limit

    def write(self, data: Any) -> int:
        if self.tell() + len(data) > self.limit:
            raise ImageError(f"{display_url(self.url)}: larger than {self.limit} bytes")
        return super().write(data)


async def fetch_small(url: str, *, checksum: str | None, timeout: float, limit: int) -> bytes:
    """A small document (a manifest) in memory, refused above `limit` bytes."""
    out = _Capped(url, limit)
    await fetch(url, out, checksum=checksum, timeout=timeout, decompress=False)
    return out.getvalue()


# -- inspecting the image ----------------------------------------------------------------

_QCOW_MAGIC = b"QFI\xfb"
_QCOW2_EXTERNAL_DATA_FILE = 1 << 2  # incompatible feature bit


def check_qcow_header(path: Path, shown: str) -> None:
    """Refuse a qcow image that names another file, before qemu-img ever opens it.

    A backing file or an external data file can be any path on the host (``-b /etc/shadow``):
    a VM booted on such an image would read that host file. The header says so in fixed
    fields, so this needs no parser: backing_file_offset (u64 at 8), and for version 3 the
    incompatible-features bit 2 (u64 at 72).
    """
    with open(path, "rb") as f:
        head = f.read(104)
    if head[:4] != _QCOW_MAGIC or len(head) < 20:
        return
    version, backing_offset = struct.unpack(">IQ", head[4:16])
    if backing_offset:
        raise ImageError(f"image {shown}: refused: it names a backing file (a host file it would read)")
    if version >= 3 and len(head) >= 80 and struct.unpack(">Q", head[72:80])[0] & _QCOW2_EXTERNAL_DATA_FILE:
        raise ImageError(f"image {shown}: refused: it uses an external data file")


async def qemu_img_info(path: Path, fmt: str | None, shown: str) -> dict[str, Any]:
    """`qemu-img info --output=json [-f fmt] path`, as a dict (no shell, bounded time)."""
    args = ["qemu-img", "info", "--output=json", *(["-f", fmt] if fmt else []), str(path)]
    proc = await asyncio.create_subprocess_exec(
        *args, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        async with asyncio.timeout(_QEMU_IMG_TIMEOUT):
            out, err = await proc.communicate()
    except BaseException:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        raise
    if proc.returncode != 0:
        msg = err.decode(errors="replace").strip().replace(str(path), "<image>")
        raise ImageError(f"image {shown}: not a usable disk image: {msg or 'qemu-img info failed'}")
    info: dict[str, Any] = json.loads(out)
    return info


def _names_other_files(info: Any) -> bool:
    if isinstance(info, dict):
        return any(
            ("backing" in key or key == "data-file") or _names_other_files(value) for key, value in info.items()
        )
    if isinstance(info, list):
        return any(_names_other_files(v) for v in info)
    return False


async def inspect_image(path: Path, shown: str) -> tuple[ImageFormat, int]:
    """(format, virtual size) of a downloaded image; only self-contained qcow2 or raw.

    The format is learnt by one probing `qemu-img info`, then confirmed with that format
    pinned (`-f`), the way it will be opened for VMs. The header check runs first, so the
    probe never opens a qcow2 that points at another host file.
    """
    await asyncio.to_thread(check_qcow_header, path, shown)
    probed = await qemu_img_info(path, None, shown)
    fmt = probed.get("format")
    if fmt not in ("qcow2", "raw"):
        raise ImageError(f"image {shown}: format {fmt!r} is not supported (use qcow2 or raw)")
    info = await qemu_img_info(path, fmt, shown)
    if _names_other_files(probed) or _names_other_files(info):
        raise ImageError(f"image {shown}: refused: it names a backing or data file (a host file it would read)")
    if info.get("encrypted"):
        raise ImageError(f"image {shown}: refused: encrypted images are not supported")
    size = info.get("virtual-size")
    if not isinstance(size, int) or size <= 0:
        raise ImageError(f"image {shown}: qemu-img reports no virtual size")
    return fmt, size
