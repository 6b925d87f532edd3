"""`herdsman install-service`: the systemd unit, the settings file and the folders, after `pip install`.

What it writes (under `--root`, for packagers and tests; nothing at all with `--dry-run`):

| path | mode | why |
|---|---|---|
| /etc/systemd/system/herdsman.service | 0644 | the unit, with ExecStart pointing at this installation's `herdsman` |
| /etc/herdsman/ | 0700 | holds the secret key |
| /etc/herdsman/herdsman.env | 0600 | the settings, from herdsman.env.example; never overwritten |
| /var/lib/herdsman/ | 0711 | qemu (libvirt-qemu) must traverse it to open disks, seeds and kernels, but may not list it |
| /var/log/herdsman/ | 0711 | the same for console logs (qemu writes them itself with qemu.conf's stdio_handler = "file") |

0711 rather than 0755: other local users cannot list which VMs live on the host (the file names
are instance uuids), while qemu, given exact paths by libvirt, reaches what it needs. The unit's
StateDirectoryMode=/LogsDirectoryMode= keep the same modes when systemd creates the folders.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import stat
import sys
import sysconfig
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

UNIT = "herdsman.service"
ENV_EXAMPLE = "herdsman.env.example"
UNIT_DIR = Path("etc/systemd/system")
CONFIG_DIR = Path("etc/herdsman")
STATE_DIR = Path("var/lib/herdsman")
LOG_DIR = Path("var/log/herdsman")
#: ProtectHome=yes in the unit hides these from the service: an ExecStart there cannot run
HIDDEN_BY_PROTECT_HOME = (Path("/home"), Path("/root"), Path("/run/user"))


class InstallError(RuntimeError):
    pass


@dataclass(frozen=True)
class Step:
    """One line of output: what was done (or would be) to which path."""

    action: str  # write, keep, mkdir, chmod, warn
    path: Path
    note: str = ""

    def line(self) -> str:
        return f"{self.action:<6} {self.path}" + (f"  {self.note}" if self.note else "")


def data_file(name: str) -> Path:
    """A file from the repository's systemd/ folder: next to the source tree (a checkout or an
    editable install) or in `<prefix>/share/herdsman` (a wheel's data files)."""
    candidates = [Path(__file__).resolve().parents[1] / "systemd" / name,
                  Path(sysconfig.get_path("data")) / "share" / "herdsman" / name,
                  Path(sys.prefix) / "share" / "herdsman" / name]
    for path in candidates:
        if path.is_file():
            return path
    raise InstallError(f"{name} is not installed (looked in {', '.join(str(p.parent) for p in candidates)})")


def default_exec_start() -> Path:
    """This installation's console script: the one next to the running interpreter."""
    script = Path(sysconfig.get_path("scripts")) / "herdsman"
    if script.is_file():
        return script
    found = shutil.which("herdsman")
    if found:
        return Path(found).absolute()
    raise InstallError("cannot find the herdsman command; give its path with --exec-start")


def unit_text(template: str, exec_start: Path) -> str:
    """The packaged unit with ExecStart pointing at `exec_start`."""
    if not exec_start.is_absolute() or re.search(r"[\s\"'\\%$;]", str(exec_start)):
        raise InstallError(f"--exec-start must be an absolute path without spaces, quotes or %$;\\: {exec_start}")
    text, count = re.subn(r"^ExecStart=\S+ run$", f"ExecStart={exec_start} run", template, flags=re.MULTILINE)
    if count != 1:
        raise InstallError(f"{UNIT} has no single 'ExecStart=... run' line to point at {exec_start}")
    return text


def install(root: Path, exec_start: Path, *, dry_run: bool = False,
            report: Callable[[Step], None] = lambda step: None) -> list[Step]:
    """Install under `root` (`/` on a host); returns (and reports) each step in order."""
    steps: list[Step] = []

    def do(step: Step, work: Callable[[], None] | None = None) -> None:
        if work is not None and not dry_run:
            work()
        steps.append(step)
        report(step)

    unit = root / UNIT_DIR / UNIT
    text = unit_text(data_file(UNIT).read_text(), exec_start)
    _directory(root / UNIT_DIR, 0o755, do, fix_mode=False)
    if unit.is_file() and unit.read_text() == text:
        do(Step("keep", unit, "unchanged"))
    else:
        do(Step("write", unit, f"0644, ExecStart={exec_start} run"), lambda: _write_atomic(unit, text, 0o644))
    if any(exec_start.is_relative_to(p) for p in HIDDEN_BY_PROTECT_HOME):
        do(Step("warn", exec_start, "is hidden from the service by the unit's ProtectHome=yes: install herdsman "
                                    "under /opt or /usr/local, or add a drop-in with ProtectHome=read-only"))

    _directory(root / CONFIG_DIR, 0o700, do, fix_mode=False)
    env = root / CONFIG_DIR / "herdsman.env"
    if env.exists():
        mode = stat.S_IMODE(env.stat().st_mode)
        do(Step("keep", env, "exists; never overwritten"))
        if mode & 0o077:
            do(Step("warn", env, f"is {mode:04o} but holds the secret key: chmod 0600 {env}"))
    else:
        example = data_file(ENV_EXAMPLE).read_text()
        do(Step("write", env, "0600, from herdsman.env.example: set CATTLE_URL and the key pair"),
           lambda: _write_new(env, example, 0o600))
    _directory(root / STATE_DIR, 0o711, do)
    _directory(root / LOG_DIR, 0o711, do)
    return steps


def _directory(path: Path, mode: int, do: Callable[[Step, Callable[[], None] | None], None], *,
               fix_mode: bool = True) -> None:
    """Create `path` with `mode`; an existing one gets `mode` when `fix_mode` (qemu needs it)."""
    if not path.exists():
        def create() -> None:
            path.mkdir(parents=True, exist_ok=True)
            os.chmod(path, mode)  # mkdir's mode is filtered by the umask
        do(Step("mkdir", path, f"{mode:04o}"), create)
        return
    if not path.is_dir():
        raise InstallError(f"{path} exists and is not a directory")
    current = stat.S_IMODE(path.stat().st_mode)
    if fix_mode and current != mode:
        do(Step("chmod", path, f"{current:04o} -> {mode:04o}"), lambda: os.chmod(path, mode))


def _write_atomic(path: Path, text: str, mode: int) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as out:
            out.write(text)
            out.flush()
            os.fchmod(out.fileno(), mode)
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_new(path: Path, text: str, mode: int) -> None:
    """Created with its final mode from the first byte, and never over an existing file."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "w") as out:
        out.write(text)


def cmd_install_service(args: argparse.Namespace) -> int:
    try:
        exec_start = Path(args.exec_start) if args.exec_start else default_exec_start()
        install(Path(args.root), exec_start, dry_run=args.dry_run, report=lambda step: print(step.line()))
    except (InstallError, OSError) as exc:
        print(f"herdsman install-service: {exc}", file=sys.stderr)
        return 1
    env = Path(args.root) / CONFIG_DIR / "herdsman.env"
    if args.dry_run:
        print("dry run: nothing was changed")
    elif Path(args.root) == Path("/"):
        print(f"next: edit {env} (CATTLE_URL, CATTLE_ACCESS_KEY, CATTLE_SECRET_KEY), then\n"
              f"      herdsman check --config {env}\n"
              "      systemctl daemon-reload && systemctl enable --now herdsman")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("install-service", help="write the systemd unit, /etc/herdsman/herdsman.env and the "
                                                    "state and log folders (after pip install)")
    parser.add_argument("--root", default="/", help="install under this folder instead of / (packaging, tests)")
    parser.add_argument("--exec-start", help="the herdsman command the unit runs (default: this installation's)")
    parser.add_argument("--dry-run", action="store_true", help="print what would be done, change nothing")
    parser.set_defaults(func=cmd_install_service)
