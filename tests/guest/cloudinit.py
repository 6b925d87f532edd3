"""cloud-init's own Python code, for tests that read our seed documents with it.

Taken from Debian's package and unpacked, never installed: an installed cloud-init would
configure this machine at its next boot. Cached beside the test guest, one folder per version,
built under a lock and renamed into place, so parallel test runs share one copy and a killed
fetch leaves nothing half-made.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from tests.guest import debs
from tests.guest.build import default_cache_dir, locked, make_dirs

PACKAGE = "cloud-init"
_SITE = "usr/lib/python3/dist-packages"


def ensure_cloudinit(cache_dir: Path | None = None) -> Path:
    """The folder to put on PYTHONPATH so `import cloudinit` finds the package's code."""
    root = cache_dir if cache_dir is not None else default_cache_dir().parent / "cloud-init"
    package = debs.Package(PACKAGE, debs.candidate_versions([PACKAGE])[PACKAGE], arch="all")
    target = root / package.version
    site = target / _SITE
    if (site / "cloudinit").is_dir():
        return site
    make_dirs(root)
    with locked(root / ".lock"):
        if (site / "cloudinit").is_dir():
            return site  # another run unpacked it while we waited
        work = root / f".unpack-{os.getpid()}"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
        try:
            deb = debs.download([package], root)[PACKAGE]
            debs.prune(root, [package])
            debs.extract(deb, work, lambda name: name.startswith(_SITE + "/"))
            shutil.rmtree(target, ignore_errors=True)
            work.rename(target)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return site
