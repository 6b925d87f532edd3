"""Host facts every agent needs whatever the hypervisor: disk space and a sane clock."""

from __future__ import annotations

import ctypes
import shutil
from email.utils import parsedate_to_datetime
from pathlib import Path

from drivers.base import HostCheck

GIB = 1 << 30
#: adjtimex(2)'s return value when the kernel's clock is not synchronised (no NTP, or lost it)
TIME_ERROR = 5


def disk_space(path: Path, *, fail_below: int = GIB, warn_below: int = 10 * GIB) -> HostCheck:
    """Free space where images, disks and seeds go (the state dir, or its nearest existing parent)."""
    existing = next(p for p in [path, *path.parents] if p.exists())
    usage = shutil.disk_usage(existing)
    detail = f"{usage.free / GIB:.1f} GiB free of {usage.total / GIB:.1f} GiB at {existing}"
    fix = f"free space on the file system of {existing}, or move HERDSMAN_STATE_DIR to a larger one"
    if usage.free < fail_below:
        return HostCheck("fail", "disk-space", detail + ": too little for a VM image", fix)
    if usage.free < warn_below:
        return HostCheck("warn", "disk-space", detail + ": a few VM images will fill it", fix)
    return HostCheck("ok", "disk-space", detail)


def kernel_clock_synchronised() -> bool | None:
    """What adjtimex(2) says (the answer timedatectl's "System clock synchronized" gives):
    None where it cannot be asked. Read-only: `modes` is 0."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        timex = ctypes.create_string_buffer(512)  # struct timex is 208 bytes on 64-bit Linux; zeroed
        state = libc.adjtimex(timex)
    except (OSError, AttributeError):
        return None
    if state < 0:
        return None
    return state != TIME_ERROR


def clock_skew(date_header: str, sent: float, received: float) -> float:
    """Seconds this host's clock is ahead of the controller's (negative: behind), from an HTTP
    Date header. Date has whole seconds, so the controller's time was [date, date + 1) at some
    moment between `sent` and `received` (this host's wall clock)."""
    date = parsedate_to_datetime(date_header).timestamp()
    return (sent + received) / 2 - (date + 0.5)


def clock(synchronised: bool | None, skew: float | None, *, warn_after: float = 5.0,
          fail_after: float = 60.0) -> HostCheck:
    """One line for both: the kernel's sync state and the offset from the controller's clock.

    Stream tokens carry expiry times, so a host minutes off refuses valid ones or accepts
    expired ones; a clock that drifts unsynchronised gets there."""
    parts = {True: "the kernel says the clock is synchronised", False: "the kernel says the clock is NOT synchronised",
             None: "the clock's sync state is unknown"}
    detail = parts[synchronised]
    if skew is None:
        detail += "; the controller's clock was not read"
    else:
        detail += f"; {abs(skew):.1f} s {'ahead of' if skew > 0 else 'behind'} the controller's"
    fix = "run an NTP client (systemd-timesyncd, chrony) on this host (and the controller)"
    if skew is not None and abs(skew) > fail_after:
        return HostCheck("fail", "clock", detail, fix)
    if synchronised is False or (skew is not None and abs(skew) > warn_after):
        return HostCheck("warn", "clock", detail, fix)
    return HostCheck("ok", "clock", detail)
