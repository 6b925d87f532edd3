"""The boot-image cache, with real parts only: images made by qemu-img, served from disk and by
an HTTP server on 127.0.0.1, stored in a directory pool of the real libvirtd (defined per test
module under a unique name and removed afterwards), overlays checked with `qemu-img info`.
The pool API's refusals are also checked against libvirt's in-process ``test:///default``.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import base64
import http.server
import itertools
import json
import logging
import lzma
import os
import shutil
import socket
import stat
import subprocess
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import libvirt
import pytest

from agent.spec.image import parse_image_ref
from drivers.base import DriverError
from drivers.libvirt.images import BaseImage, ImageCache, ImageError
from drivers.libvirt.images_fetch import _Gzip, _Xz, display_url
from drivers.libvirt.layout import HostLayout
from tests.libvirtd_fixtures import needs_libvirtd

MIB = 1 << 20




def qemu_img(*args: str) -> dict:
    out = subprocess.run(["qemu-img", *args], check=True, capture_output=True, text=True).stdout
    return json.loads(out) if "--output=json" in args else {}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- images and the HTTP server ------------------------------------------------------------


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    """disk.raw (8 MiB of random data), disk.qcow2 (64 MiB virtual, the same data) and their
    .gz; small.raw/small.qcow2 (1 MiB: xz of random data is slow to make) and their .xz; and
    two hostile qcow2: one backed by /etc/passwd, one with an external data file."""
    d = tmp_path_factory.mktemp("images")
    for stem, size, compress, suffix in (("disk", 8, gzip.compress, "gz"),
                                         ("small", 1, lambda b: lzma.compress(b, preset=0), "xz")):
        raw = d / f"{stem}.raw"
        raw.write_bytes(os.urandom(size * MIB))
        subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", raw, d / f"{stem}.qcow2"],
                       check=True)
        subprocess.run(["qemu-img", "resize", "-q", "-f", "qcow2", d / f"{stem}.qcow2", "64M"], check=True)
        for name in (f"{stem}.raw", f"{stem}.qcow2"):
            (d / f"{name}.{suffix}").write_bytes(compress((d / name).read_bytes()))
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", "/etc/passwd", "-F", "raw",
                    d / "evil.qcow2"], check=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", f"data_file={d / 'evil.data'}",
                    d / "datafile.qcow2", "16M"], check=True)
    kdir = d / "k"
    kdir.mkdir()
    (kdir / "vmlinuz").write_bytes(os.urandom(3 * MIB))
    (kdir / "initrd.img").write_bytes(os.urandom(2 * MIB))
    return {p.name: p for p in d.iterdir()} | {"dir": d}


BASIC_AUTH = "Basic " + base64.b64encode(b"herd:s3cret").decode()


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self.server.hits[self.path] += 1
        mode, _, rel = self.path.lstrip("/").partition("?")[0].partition("/")
        if mode == "auth" and self.headers.get("Authorization") != BASIC_AUTH:
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="images"')
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if mode == "redirect":
            self.send_response(302)
            self.send_header("Location", f"/files/{rel}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = self.server.documents.get(rel)
        if body is None:
            path = self.server.root / rel
            body = path.read_bytes() if path.is_file() else None
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            if mode in ("files", "auth"):
                self.wfile.write(body)
            elif mode == "drop":  # half of it, then the connection is cut
                self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)
                self.close_connection = True
            elif mode == "slow":  # 1 MiB every 0.1 s
                for i in range(0, len(body), MIB):
                    self.wfile.write(body[i : i + MIB])
                    self.wfile.flush()
                    time.sleep(0.1)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, root: Path) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.root = root
        self.hits: Counter[str] = Counter()
        self.documents: dict[str, bytes] = {}

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/{path}"


@pytest.fixture(scope="module")
def server(images) -> Iterator[_Server]:
    srv = _Server(images["dir"])
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


# -- a real directory pool in libvirtd -----------------------------------------------------


@dataclass
class Host:
    conn: libvirt.virConnect
    layout: HostLayout
    pool_path: Path
    cache: ImageCache

    def pool(self) -> libvirt.virStoragePool:
        return self.conn.storagePoolLookupByName(self.layout.storage_pool)

    def leftovers(self) -> list[str]:
        """Image files and temp files in the pool: what a failed fetch must not leave."""
        found = [p.name for p in self.pool_path.glob("image-*")]
        work = self.pool_path / ".work"
        return found + ([f".work/{p.name}" for p in work.iterdir()] if work.exists() else [])


@pytest.fixture
def host(tmp_path) -> Iterator[Host]:
    conn = libvirt.open("qemu:///system")
    layout = HostLayout(state_dir=tmp_path / "state", log_dir=tmp_path / "log",
                        storage_pool=f"herdsman-test-{uuid.uuid4().hex[:10]}")
    pool_path = tmp_path / "pool"
    try:
        yield Host(conn, layout, pool_path, ImageCache(layout, pool_path=pool_path, download_timeout=30))
    finally:
        try:
            pool = conn.storagePoolLookupByName(layout.storage_pool)
            if pool.isActive():
                pool.destroy()
            pool.undefine()
        except libvirt.libvirtError:
            pass
        conn.close()
        shutil.rmtree(tmp_path, ignore_errors=True)


def closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


# -- decompression (pure) --------------------------------------------------------------------


class _Collect:
    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.largest = 0

    def write(self, data: bytes) -> int:
        self.parts.append(data)
        self.largest = max(self.largest, len(data))
        return len(data)


@pytest.mark.parametrize("kind", ["gz", "xz"])
def test_decompression_is_bounded_and_accepts_concatenated_streams_and_padding(kind):
    compress = gzip.compress if kind == "gz" else lambda data: lzma.compress(data, preset=0)
    bomb = compress(bytes(64 * MIB))  # a few KiB that expand a thousandfold
    stream = bomb + compress(b"tail") + bytes(8)
    d, out = (_Gzip() if kind == "gz" else _Xz()), _Collect()
    for i in range(0, len(stream), 4096):
        d.feed(stream[i : i + 4096], out)  # type: ignore[arg-type]
    d.finish()
    data = b"".join(out.parts)
    assert len(data) == 64 * MIB + 4 and data.endswith(b"tail")
    assert out.largest <= 4 * MIB  # never the whole expansion at once

    truncated, out = (_Gzip() if kind == "gz" else _Xz()), _Collect()
    truncated.feed(bomb[: len(bomb) // 2], out)  # type: ignore[arg-type]
    with pytest.raises(EOFError):
        truncated.finish()


def test_urls_in_messages_carry_no_credentials_or_tokens():
    assert display_url("https://user:pw@images.example:8443/x.qcow2?sig=abc") == "https://images.example:8443/x.qcow2?…"
    assert display_url("http://[::1]:8080/x.raw") == "http://[::1]:8080/x.raw"
    assert display_url("file:///srv/images/x.qcow2") == "file:///srv/images/x.qcow2"


# -- disk images in a real pool --------------------------------------------------------------


@needs_libvirtd
async def test_file_image_is_cached_once_as_a_read_only_volume(host, images, caplog):
    ref = parse_image_ref(f"file://{images['disk.qcow2']}")
    t0 = time.perf_counter()
    with caplog.at_level(logging.WARNING, logger="herdsman.images"):
        base = await host.cache.ensure_disk_image(host.conn, ref)
    first = time.perf_counter() - t0
    assert [r.message for r in caplog.records] == ["image has no checksum; it is used unverified"]
    assert base.format == "qcow2" and base.virtual_size == 64 * MIB
    assert base.volume_name == f"image-{host.layout.image_key(ref.url)}.qcow2"
    assert Path(base.path) == host.pool_path / base.volume_name
    assert stat.S_IMODE(os.stat(base.path).st_mode) == 0o444
    assert Path(base.path).read_bytes() == images["disk.qcow2"].read_bytes()
    assert host.pool().storageVolLookupByName(base.volume_name).path() == base.path
    assert list((host.pool_path / ".work").iterdir()) == []

    t0 = time.perf_counter()
    again = await host.cache.ensure_disk_image(host.conn, ref)
    second = time.perf_counter() - t0
    assert again == base
    assert second < first / 5, (first, second)
    # a fresh cache (an agent restart) finds it in the pool as well
    restarted = ImageCache(host.layout, pool_path=host.pool_path)
    assert await restarted.ensure_disk_image(host.conn, ref) == base


@needs_libvirtd
async def test_http_image_downloads_once_with_increasing_progress(host, images, server):
    path = f"files/disk.raw?run={uuid.uuid4().hex}"
    ref = parse_image_ref(server.url(path))
    reports: list[tuple[int, str]] = []

    async def progress(percent: int, message: str) -> None:
        reports.append((percent, message))

    base = await host.cache.ensure_disk_image(host.conn, ref, checksum=sha256(images["disk.raw"].read_bytes()),
                                              progress=progress)
    assert base.format == "raw" and base.virtual_size == 8 * MIB
    assert sha256(Path(base.path).read_bytes()) == sha256(images["disk.raw"].read_bytes())
    percents = [p for p, _ in reports]
    assert len(percents) >= 5 and percents[-1] == 100
    assert all(b - a >= 3 for a, b in itertools.pairwise(percents)), percents
    assert "127.0.0.1" in reports[0][1] and "run=" not in reports[0][1]  # no query string shown

    await host.cache.ensure_disk_image(host.conn, ref, checksum=sha256(images["disk.raw"].read_bytes()))
    assert server.hits["/" + path] == 1


@needs_libvirtd
@pytest.mark.parametrize("name", ["disk.qcow2.gz", "small.qcow2.xz", "disk.raw.gz", "small.raw.xz"])
async def test_compressed_images_are_unpacked_and_verified_as_downloaded(host, images, server, name):
    compressed = images[name].read_bytes()
    plain = images[name.rsplit(".", 1)[0]].read_bytes()
    ref = parse_image_ref(server.url(f"redirect/{name}") + f"#sha256={sha256(compressed)}")
    base = await host.cache.ensure_disk_image(host.conn, ref)
    assert base.format == name.split(".")[1]
    assert sha256(Path(base.path).read_bytes()) == sha256(plain)
    # the checksum covers the downloaded (compressed) bytes, not the image inside
    other = parse_image_ref(f"file://{images[name]}#sha256={sha256(plain)}")
    with pytest.raises(ImageError, match="checksum mismatch"):
        await host.cache.ensure_disk_image(host.conn, other)


@needs_libvirtd
async def test_concurrent_requests_share_one_download(host, images, server):
    path = f"slow/disk.qcow2.gz?run={uuid.uuid4().hex}"
    ref = parse_image_ref(server.url(path))
    seen: list[list[int]] = [[] for _ in range(4)]

    def progress_for(i: int):
        async def progress(percent: int, message: str) -> None:
            seen[i].append(percent)
        return progress

    results = await asyncio.gather(*(host.cache.ensure_disk_image(host.conn, ref, progress=progress_for(i))
                                     for i in range(4)))
    assert server.hits["/" + path] == 1
    assert len(set(results)) == 1 and results[0].format == "qcow2"
    assert all(s and s[-1] == 100 for s in seen)


@needs_libvirtd
async def test_bad_checksum_is_refused_leaves_nothing_and_is_not_cached(host, images, server):
    data = images["disk.qcow2"].read_bytes()
    path = f"files/disk.qcow2?run={uuid.uuid4().hex}"
    ref = parse_image_ref(server.url(path))
    wrong = sha256(b"something else")
    with pytest.raises(ImageError) as err:
        await host.cache.ensure_disk_image(host.conn, ref, checksum=wrong)
    assert wrong in str(err.value) and sha256(data) in str(err.value) and "127.0.0.1" in str(err.value)
    assert host.leftovers() == []
    # a bare md5 (as Cattle sends it) selects the algorithm by length; the retry downloads again
    base = await host.cache.ensure_disk_image(host.conn, ref, checksum=hashlib.md5(data).hexdigest())
    assert base.format == "qcow2" and server.hits["/" + path] == 2


@needs_libvirtd
async def test_unreachable_and_missing_urls_are_image_errors(host, server):
    ref = parse_image_ref(f"http://127.0.0.1:{closed_port()}/disk.qcow2")
    with pytest.raises(ImageError, match=r"127\.0\.0\.1.*ConnectError"):
        await host.cache.ensure_disk_image(host.conn, ref)
    with pytest.raises(ImageError, match="HTTP 404"):
        await host.cache.ensure_disk_image(host.conn, parse_image_ref(server.url("files/nope.qcow2")))
    with pytest.raises(ImageError, match="No such file"):
        await host.cache.ensure_disk_image(host.conn, parse_image_ref("file:///nonexistent/disk.qcow2"))
    assert host.leftovers() == []


@needs_libvirtd
async def test_a_private_image_server_gets_the_credentials_of_the_url_and_they_are_never_shown(host, images, server):
    """registryCredentialId carries no secret; a private server's credentials go in the URL."""
    digest = sha256(images["disk.raw"].read_bytes())
    with pytest.raises(ImageError, match="HTTP 401") as refused:
        await host.cache.ensure_disk_image(host.conn, parse_image_ref(server.url("auth/disk.raw")))
    url = server.url("auth/disk.raw").replace("http://", "http://herd:s3cret@")
    with pytest.raises(ImageError) as wrong:
        await host.cache.ensure_disk_image(host.conn, parse_image_ref(url.replace("s3cret", "wrong")))
    assert "wrong" not in str(wrong.value) and "herd" not in str(refused.value)
    assert host.leftovers() == []  # refused downloads leave nothing
    base = await host.cache.ensure_disk_image(host.conn, parse_image_ref(url), checksum=digest)
    assert sha256(Path(base.path).read_bytes()) == digest


@needs_libvirtd
async def test_device_files_and_fifos_are_refused(host, tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for url in ("file:///dev/zero", f"file://{fifo}", f"file://{tmp_path}"):
        with pytest.raises(ImageError, match="not a regular file"):
            await asyncio.wait_for(host.cache.ensure_disk_image(host.conn, parse_image_ref(url)), 5)
    assert host.leftovers() == []


@needs_libvirtd
@pytest.mark.parametrize("name", ["evil.qcow2", "datafile.qcow2"])
async def test_images_naming_host_files_are_refused(host, images, server, name):
    for url in (f"file://{images[name]}", server.url(f"files/{name}")):
        with pytest.raises(ImageError, match="refused: it (names a backing file|uses an external data file)"):
            await host.cache.ensure_disk_image(host.conn, parse_image_ref(url))
    assert host.leftovers() == []


@needs_libvirtd
async def test_a_dropped_connection_leaves_no_partial_file(host, server):
    ref = parse_image_ref(server.url("drop/disk.raw"))
    with pytest.raises(ImageError, match=r"127\.0\.0\.1.*(RemoteProtocolError|ReadError|got \d+ of)"):
        await host.cache.ensure_disk_image(host.conn, ref)
    assert host.leftovers() == []


@needs_libvirtd
async def test_cancelling_the_last_waiter_stops_the_download_and_deletes_it(host, server):
    ref = parse_image_ref(server.url(f"slow/disk.qcow2.gz?run={uuid.uuid4().hex}"))
    started = asyncio.Event()

    async def progress(percent: int, message: str) -> None:
        if 0 < percent < 100:
            started.set()

    one = asyncio.create_task(host.cache.ensure_disk_image(host.conn, ref, progress=progress))
    two = asyncio.create_task(host.cache.ensure_disk_image(host.conn, ref))
    await asyncio.wait_for(started.wait(), 10)
    one.cancel()  # the other still waits: the download goes on
    await asyncio.sleep(0.2)
    assert not two.done() and len(list((host.pool_path / ".work").iterdir())) == 1
    two.cancel()
    for task in (one, two):
        with pytest.raises(asyncio.CancelledError):
            await task
    assert host.leftovers() == []


@needs_libvirtd
async def test_overlay_is_a_copy_on_write_volume_of_the_requested_size(host, images):
    base = await host.cache.ensure_disk_image(host.conn, parse_image_ref(f"file://{images['disk.qcow2']}"))
    raw = await host.cache.ensure_disk_image(host.conn, parse_image_ref(f"file://{images['disk.raw']}"))
    pool = host.pool()
    for image, size in ((base, 1 << 30), (raw, 8 * MIB)):
        vol = host.cache.create_overlay(pool, f"vm-{image.format}-root.qcow2", image, size)
        info = qemu_img("info", "--output=json", "-f", "qcow2", vol.path())
        assert info["virtual-size"] == size
        assert info["backing-filename"] == image.path
        assert info["backing-filename-format"] == image.format
        assert vol.info()[1] == size
    # the guest sees the image's data through the overlay
    vol = pool.storageVolLookupByName("vm-raw-root.qcow2")
    converted = host.pool_path / "flat.raw"
    qemu_img("convert", "-q", "-f", "qcow2", "-O", "raw", vol.path(), str(converted))
    assert converted.read_bytes() == images["disk.raw"].read_bytes()

    with pytest.raises(ImageError, match="smaller than its image"):
        host.cache.create_overlay(pool, "vm-small.qcow2", base, 32 * MIB)
    with pytest.raises(DriverError, match="do not fit"):
        host.cache.create_overlay(pool, "vm-huge.qcow2", base, pool.info()[3] + (1 << 40))
    names = set(pool.listVolumes())
    assert "vm-small.qcow2" not in names and "vm-huge.qcow2" not in names


def test_overlay_through_the_test_driver_pool_api():
    conn = libvirt.open("test:///default")
    try:
        pool = conn.storagePoolLookupByName("default-pool")
        cache = ImageCache(HostLayout(), pool_path=Path("/default-pool"))
        base = BaseImage("image-x.qcow2", "/default-pool/image-x.qcow2", "qcow2", 2 * MIB)
        vol = cache.create_overlay(pool, "vm-root.qcow2", base, 10 * MIB)
        xml = vol.XMLDesc()
        assert "<path>/default-pool/image-x.qcow2</path>" in xml and "<format type='qcow2'/>" in xml
        assert vol.info()[1] == 10 * MIB
        with pytest.raises(ImageError, match="already exists"):
            cache.create_overlay(pool, "vm-root.qcow2", base, 10 * MIB)
        with pytest.raises(ImageError, match="smaller"):
            cache.create_overlay(pool, "vm-2.qcow2", base, MIB)
        with pytest.raises(DriverError, match="do not fit"):
            cache.create_overlay(pool, "vm-3.qcow2", base, pool.info()[1] + 1)
    finally:
        conn.close()


# -- kernel images ---------------------------------------------------------------------------


def _manifest(server: _Server, images, tag: str, **overrides: object) -> str:
    manifest = {
        "kernel": "vmlinuz",
        "initrd": "../k/initrd.img",
        "cmdline": "console=ttyS0 panic=-1",
        "checksums": {"kernel": f"sha256:{sha256(images['k'].joinpath('vmlinuz').read_bytes())}",
                      "initrd": sha256(images["k"].joinpath("initrd.img").read_bytes())},
    } | overrides
    server.documents[f"k/{tag}.json"] = json.dumps(manifest).encode()
    return server.url(f"files/k/{tag}.json")


@needs_libvirtd
async def test_kernel_manifest_with_relative_paths_and_checksums(host, images, server):
    url = _manifest(server, images, uuid.uuid4().hex)
    ref = parse_image_ref(f"kernel:{url}")
    reports: list[int] = []

    async def progress(percent: int, message: str) -> None:
        reports.append(percent)

    boots = await asyncio.gather(*(host.cache.ensure_kernel_image(host.conn, ref, progress=progress)
                                   for _ in range(3)))
    boot = boots[0]
    assert len(set(boots)) == 1
    kdir = host.layout.kernel_dir(ref.url)
    assert boot.kernel == str(kdir / "kernel") and boot.initrd == str(kdir / "initrd")
    assert boot.cmdline == "console=ttyS0 panic=-1"
    assert Path(boot.kernel).read_bytes() == images["k"].joinpath("vmlinuz").read_bytes()
    assert Path(boot.initrd).read_bytes() == images["k"].joinpath("initrd.img").read_bytes()
    assert stat.S_IMODE(kdir.stat().st_mode) == 0o755
    assert all(stat.S_IMODE(os.stat(p).st_mode) == 0o644 for p in (boot.kernel, boot.initrd))
    assert sorted(p.name for p in kdir.parent.iterdir()) == [kdir.name]  # no staging dir left
    assert reports == sorted(reports) and reports[-1] == 100
    assert server.hits["/files/k/vmlinuz"] >= 1
    before = dict(server.hits)
    assert await ImageCache(host.layout, pool_path=host.pool_path).ensure_kernel_image(host.conn, ref) == boot
    assert dict(server.hits) == before  # served from the host


@needs_libvirtd
async def test_kernel_manifest_errors(host, images, server):
    async def ensure(url: str) -> object:
        return await host.cache.ensure_kernel_image(host.conn, parse_image_ref(f"kernel:{url}"))

    bad = _manifest(server, images, uuid.uuid4().hex, checksums={"kernel": sha256(b"x")})
    with pytest.raises(ImageError, match="checksum mismatch"):
        await ensure(bad)
    with pytest.raises(ImageError, match="root: Extra inputs are not permitted"):
        await ensure(_manifest(server, images, uuid.uuid4().hex, root="/dev/vda"))
    with pytest.raises(ImageError, match="may not name host files"):
        await ensure(_manifest(server, images, uuid.uuid4().hex, kernel="file:///etc/shadow"))
    with pytest.raises(ImageError, match="cmdline"):
        await ensure(_manifest(server, images, uuid.uuid4().hex, cmdline="a\nb"))
    kernels = host.layout.state_dir / "kernels"
    assert not kernels.exists() or list(kernels.iterdir()) == []

    # a local manifest (operator's files) may name local files; no checksums: accepted
    local = images["dir"] / "local-manifest.json"
    local.write_text(json.dumps({"kernel": "k/vmlinuz"}))
    boot = await ensure(f"file://{local}")
    assert boot.initrd is None and boot.cmdline == "console=ttyS0"
