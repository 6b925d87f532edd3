"""The cloud-init NoCloud seed image: an ISO9660 volume labelled `cidata`, built in Python.

pycdlib writes the image in-process (well under a millisecond for a seed), so no
genisoimage/xorriso binary is needed on the host. Rock Ridge and Joliet names make the
files appear as `user-data`, `meta-data`, `network-config` on Linux and Windows guests.

Change detection: the digest of the rendered files is written into the image itself, in
the primary volume descriptor's application identifier (`isoinfo -d` shows it). Keeping it
inside the file means content and digest are replaced together by one rename, work on any
filesystem (a user xattr does not survive every filesystem or copy tool), and leave no
sidecar file to go stale or clean up.
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path

import pycdlib

from drivers.libvirt.seed_files import SeedInputs, render_seed_files

__all__ = [
    "SeedInputs",
    "build_seed_iso",
    "recorded_digest",
    "render_seed_files",
    "seed_digest",
    "write_seed",
]

VOLUME_LABEL = "cidata"
# The Joliet descriptor holds the same identifier in UCS-2, so it must fit 64 characters:
# the sha256 goes in as unpadded base32 (52 characters, all ISO9660 a-characters).
_APP_ID_PREFIX = "HERDSMAN:"
_DIGEST_VERSION = b"herdsman-seed-v1\0"
_PVD_OFFSET = 16 * 2048  # ISO9660: system area is 16 sectors, the PVD comes first after it
_APP_ID_SLICE = slice(574, 702)  # application identifier, 128 bytes, within the PVD
_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")  # used with fullmatch


def files_digest(files: dict[str, bytes]) -> str:
    """sha256 hex over the names and contents, length-prefixed so no two sets collide."""
    h = hashlib.sha256(_DIGEST_VERSION)
    for name in sorted(files):
        data = files[name]
        h.update(name.encode("ascii") + b"\0" + len(data).to_bytes(8, "big") + data)
    return h.hexdigest()


def seed_digest(inputs: SeedInputs) -> str:
    """The digest a seed built from these inputs carries; equal inputs, equal digest."""
    return files_digest(render_seed_files(inputs))


def build_seed_iso(files: dict[str, bytes]) -> bytes:
    """An ISO9660 image (label `cidata`, Rock Ridge 1.09, Joliet level 3) holding `files`.

    ISO9660 level-1 names are derived (`user-data` -> `/USERDATA.;1`); guests read the
    Rock Ridge or Joliet name. The files' digest goes into the application identifier.
    """
    iso = pycdlib.PyCdlib()
    iso.new(
        interchange_level=1,
        vol_ident=VOLUME_LABEL,
        rock_ridge="1.09",
        joliet=3,
        app_ident_str=_app_ident(files_digest(files)),
    )
    seen: set[str] = set()
    try:
        for name in sorted(files):
            if not _NAME.fullmatch(name):
                raise ValueError(f"seed: bad file name {name!r}")
            iso_name = re.sub(r"[^A-Z0-9]", "", name.upper())[:8] + ".;1"
            if iso_name in seen:
                raise ValueError(f"seed: file names clash in ISO9660 as {iso_name}")
            seen.add(iso_name)
            data = files[name]
            iso.add_fp(
                io.BytesIO(data),
                len(data),
                "/" + iso_name,
                rr_name=name,
                joliet_path="/" + name,
            )
        out = io.BytesIO()
        iso.write_fp(out)
        return out.getvalue()
    finally:
        iso.close()


def recorded_digest(path: Path) -> str | None:
    """The files digest recorded in the seed at `path`; None if absent or not our seed."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:  # absent, a symlink (ELOOP), unreadable...: "must rebuild"
        return None
    with os.fdopen(fd, "rb") as f:
        f.seek(_PVD_OFFSET)
        pvd = f.read(2048)
    if len(pvd) < 2048 or pvd[0:6] != b"\x01CD001":
        return None
    app_id = pvd[_APP_ID_SLICE].decode("ascii", "replace").rstrip()
    if not app_id.startswith(_APP_ID_PREFIX):
        return None
    try:
        raw = base64.b32decode(app_id[len(_APP_ID_PREFIX) :] + "====")
    except ValueError:
        return None
    return raw.hex() if len(raw) == 32 else None


def _app_ident(digest: str) -> str:
    return _APP_ID_PREFIX + base64.b32encode(bytes.fromhex(digest)).decode("ascii").rstrip("=")


def write_seed(
    path: Path,
    inputs: SeedInputs,
    *,
    mode: int = 0o600,
    before_replace: Callable[[Path], None] | None = None,
) -> bool:
    """Write the seed ISO at `path` unless the one there was built from the same files.

    Returns True when it (re)built the image. The new image is written to a temp file in
    the same directory, fsynced and chmod'ed, then renamed over `path`, so a reader (or a
    crash) sees the old seed or the new one, never a mix; the temp file is removed on any
    failure. `before_replace(temp_path)` runs just before the rename (a test seam for
    interrupting a write). An unchanged seed is left alone apart from restoring `mode`.
    """
    path = Path(path)
    files = render_seed_files(inputs)
    digest = files_digest(files)
    if recorded_digest(path) == digest:
        if (path.stat().st_mode & 0o7777) != mode:
            os.chmod(path, mode)
        return False
    image = build_seed_iso(files)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(image)
            f.flush()
            os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        if before_replace is not None:
            before_replace(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return True


def _fsync_dir(directory: Path) -> None:
    """Make the rename itself durable (the new name must survive a power cut)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
