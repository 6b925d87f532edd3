"""`herdsman install-service`: the layout and modes it writes under a temp root, what it never
overwrites, `systemd-analyze verify` on the unit it wrote, and the whole path from a wheel
(`pip install` into a fresh virtualenv, then its own `herdsman install-service`)."""

from __future__ import annotations

import configparser
import os
import shutil
import stat
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from agent.install import InstallError, install, unit_text
from tests.agent_harness import REPO

pytestmark = pytest.mark.timeout(300)

UNIT = REPO / "systemd" / "herdsman.service"
EXAMPLE = REPO / "systemd" / "herdsman.env.example"
SCRIPT = Path(sysconfig.get_path("scripts")) / "herdsman"


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def install_service(*args: str, python: str = sys.executable) -> subprocess.CompletedProcess[str]:
    return subprocess.run([python, "-m", "agent", "install-service", *args], capture_output=True, text=True,
                          timeout=120, cwd=REPO, check=False)


def verify(unit: Path) -> None:
    done = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    complaints = [line for line in (done.stdout + done.stderr).splitlines() if "herdsman" in line]
    assert done.returncode == 0 and complaints == [], done.stdout + done.stderr


def test_install_writes_the_layout_with_its_modes(tmp_path: Path) -> None:
    root = tmp_path / "root"
    done = install_service("--root", str(root), "--exec-start", str(SCRIPT))
    assert done.returncode == 0, done.stderr
    unit = root / "etc/systemd/system/herdsman.service"
    env = root / "etc/herdsman/herdsman.env"
    assert done.stdout.splitlines() == [
        f"mkdir  {root}/etc/systemd/system  0755",
        f"write  {unit}  0644, ExecStart={SCRIPT} run",
        f"mkdir  {root}/etc/herdsman  0700",
        f"write  {env}  0600, from herdsman.env.example: set CATTLE_URL and the key pair",
        f"mkdir  {root}/var/lib/herdsman  0711",
        f"mkdir  {root}/var/log/herdsman  0711",
    ]
    assert (mode(unit), mode(env.parent), mode(env)) == (0o644, 0o700, 0o600)
    assert (mode(root / "var/lib/herdsman"), mode(root / "var/log/herdsman")) == (0o711, 0o711)
    assert env.read_text() == EXAMPLE.read_text()
    assert unit.read_text() == UNIT.read_text().replace("ExecStart=/usr/local/bin/herdsman run",
                                                        f"ExecStart={SCRIPT} run")
    verify(unit)

    # again: nothing rewritten; the operator's settings survive; a folder tightened by hand is
    # made traversable for qemu again; a readable env file is pointed out
    env.write_text("CATTLE_URL=http://cattle.internal:8080/v1\n")
    os.chmod(env, 0o644)
    os.chmod(root / "var/lib/herdsman", 0o700)
    done = install_service("--root", str(root), "--exec-start", str(SCRIPT))
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        f"keep   {unit}  unchanged",
        f"keep   {env}  exists; never overwritten",
        f"warn   {env}  is 0644 but holds the secret key: chmod 0600 {env}",
        f"chmod  {root}/var/lib/herdsman  0700 -> 0711",
    ]
    assert env.read_text() == "CATTLE_URL=http://cattle.internal:8080/v1\n"
    assert mode(root / "var/lib/herdsman") == 0o711


def test_dry_run_changes_nothing(tmp_path: Path) -> None:
    root = tmp_path / "root"
    done = install_service("--root", str(root), "--exec-start", str(SCRIPT), "--dry-run")
    assert done.returncode == 0, done.stderr
    assert f"write  {root}/etc/herdsman/herdsman.env" in done.stdout
    assert done.stdout.splitlines()[-1] == "dry run: nothing was changed"
    assert not root.exists()


def test_unit_folders_get_the_modes_install_uses() -> None:
    parser = configparser.ConfigParser(interpolation=None, strict=True)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(UNIT.read_text())
    service = parser["Service"]
    assert (service["StateDirectoryMode"], service["LogsDirectoryMode"]) == ("0711", "0711")
    assert service["ConfigurationDirectoryMode"] == "0700"


def test_bad_exec_start_and_a_home_install(tmp_path: Path) -> None:
    with pytest.raises(InstallError, match="absolute path"):
        unit_text(UNIT.read_text(), Path("relative/herdsman"))
    with pytest.raises(InstallError, match="absolute path"):
        unit_text(UNIT.read_text(), Path("/opt/my venv/bin/herdsman"))
    steps = install(tmp_path, Path("/root/.local/bin/herdsman"), dry_run=True)
    assert [s.action for s in steps if "ProtectHome" in s.note] == ["warn"]
    assert not (tmp_path / "etc").exists()


def test_from_a_wheel_into_a_fresh_virtualenv(tmp_path: Path) -> None:
    """What an operator does: pip install the package, then herdsman install-service. The wheel
    is built from a copy of the tree (no build files left in the checkout); the dependencies
    come from this environment through a .pth line, so the test needs no download."""
    src = tmp_path / "src"
    for name in ("pyproject.toml", "README.md"):
        src.mkdir(exist_ok=True)
        shutil.copy(REPO / name, src / name)
    for folder in ("agent", "drivers", "systemd"):
        shutil.copytree(REPO / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    built = subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"),
                            str(src)], capture_output=True, text=True, timeout=240)
    assert built.returncode == 0, built.stderr
    [wheel] = (tmp_path / "dist").glob("herdsman-*.whl")

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "herdsman-test-deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    done = subprocess.run([*pip, "--python", str(python), "install", "--no-deps", "--no-index", str(wheel)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr

    herdsman = venv / "bin" / "herdsman"
    root = tmp_path / "root"
    done = subprocess.run([str(herdsman), "install-service", "--root", str(root)], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    unit = root / "etc/systemd/system/herdsman.service"
    assert f"ExecStart={herdsman} run" in unit.read_text()
    assert (root / "etc/herdsman/herdsman.env").read_text() == EXAMPLE.read_text()
    verify(unit)
    # the installed command is the package from the wheel, not this checkout
    where = subprocess.run([str(python), "-c", "import agent; print(agent.__file__)"], capture_output=True,
                           text=True, check=True, cwd=tmp_path).stdout.strip()
    assert where.startswith(str(site)), where
