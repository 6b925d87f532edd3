"""`herdsman check`: the pure verdicts, then the command on this very machine (root, the real
libvirtd) with good inputs and deliberately broken ones, and the run at agent start-up."""

from __future__ import annotations

import asyncio
import logging
import os
import stat
import sys
import uuid
from email.utils import formatdate
from pathlib import Path

import pytest

from agent.check import exit_code, format_lines
from agent.check.host import clock, clock_skew, disk_space
from drivers.libvirt.host_dirs import can_search, first_blocked
from agent.check.startup import log_host_checks
from agent.config import AgentConfig
from drivers.base import HostCheck
from drivers.libvirt.preflight import kvm_device, stdio_handler
from tests.agent_harness import REPO, AgentProcess
from tests.controller_double import ControllerDouble
from tests.libvirtd_fixtures import host_dirs, needs_libvirtd, system_conn  # noqa: F401 (fixtures)


def st(mode: int, uid: int = 0, gid: int = 0) -> os.stat_result:
    return os.stat_result((stat.S_IFDIR | mode, 0, 0, 2, uid, gid, 0, 0, 0, 0))


# -- pure verdicts -------------------------------------------------------------------------------
@pytest.mark.parametrize(("mode", "owner", "group", "ok"), [
    (0o711, 0, 0, True),       # others may search
    (0o700, 0, 0, False),      # root only
    (0o750, 0, 107, True),     # through the group
    (0o705, 0, 107, False),    # in the group: the group's bits decide, not the others'
    (0o070, 64055, 0, False),  # the owner's bits decide for the owner
    (0o100, 64055, 0, True),
])
def test_search_permission_as_posix_decides(mode: int, owner: int, group: int, ok: bool) -> None:
    assert can_search(st(mode, owner, group), 64055, {107, 64055}) is ok
    assert can_search(st(mode, owner, group), 0, set()) is True


def test_the_first_blocked_folder_is_named(tmp_path: Path) -> None:
    deep = tmp_path / "a" / "b"
    deep.mkdir(parents=True)
    os.chmod(tmp_path / "a", 0o700)
    found = first_blocked(deep / "not-yet", 64055, {64055})
    assert found is not None
    assert found[0] in (tmp_path / "a", *tmp_path.parents)  # pytest's own tmp folders are 0700 too
    os.chmod(tmp_path / "a", 0o711)
    assert first_blocked(deep, 0, set()) is None


def test_clock_verdicts() -> None:
    assert clock(True, 0.4).status == "ok"
    assert clock(None, None).status == "ok"
    assert clock(False, 0.1).status == "warn"
    assert "NOT synchronised" in clock(False, None).detail
    assert clock(True, -12.0).status == "warn" and "12.0 s behind" in clock(True, -12.0).detail
    assert clock(True, 3600.0).status == "fail" and "ahead of the controller" in clock(True, 3600.0).detail


def test_clock_skew_from_a_date_header() -> None:
    now = 1_800_000_000.3
    assert abs(clock_skew(formatdate(now, usegmt=True), now - 0.05, now + 0.05)) <= 0.5
    assert clock_skew(formatdate(now - 120, usegmt=True), now, now) == pytest.approx(120, abs=1)


def test_disk_space_thresholds(tmp_path: Path) -> None:
    assert disk_space(tmp_path / "missing" / "state", fail_below=0, warn_below=0).status == "ok"
    assert disk_space(tmp_path, fail_below=1 << 60).status == "fail"
    assert disk_space(tmp_path, fail_below=0, warn_below=1 << 60).status == "warn"


def test_lines_and_exit_code() -> None:
    checks = [HostCheck("ok", "libvirtd", "fine"), HostCheck("fail", "state-dir", "bad", "chmod o+x /x")]
    assert format_lines(checks) == ["ok    libvirtd   fine", "fail  state-dir  bad  fix: chmod o+x /x"]
    assert exit_code(checks) == 1 and exit_code(checks[:1]) == 0


def test_kvm_device_mode(tmp_path: Path) -> None:
    node = tmp_path / "kvm"
    node.touch(mode=0o600)
    check = kvm_device(node)
    assert check.status == "warn" and "re-probes qemu" in check.detail and "chmod 0660" in (check.fix or "")
    assert kvm_device(tmp_path / "none").status == "warn"


def test_stdio_handler_from_qemu_conf(tmp_path: Path) -> None:
    conf = tmp_path / "qemu.conf"
    conf.write_text('#stdio_handler = "file"\n')
    assert stdio_handler(conf) == "logd"
    conf.write_text('stdio_handler = "file"\n')
    assert stdio_handler(conf) == "file"


# -- the command on this machine -----------------------------------------------------------------
async def herdsman_check(*args: str) -> tuple[int, dict[str, tuple[str, str]]]:
    """Exit code, and name → (status, rest of the line) of `herdsman check ARGS`."""
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "agent", "check", *args, cwd=REPO,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    lines: dict[str, tuple[str, str]] = {}
    for line in out.decode().splitlines():
        status, name, rest = line.split(None, 2)
        assert status in ("ok", "warn", "fail"), line
        lines[name] = (status, rest)
    assert lines, err.decode()
    return proc.returncode or 0, lines


@needs_libvirtd
async def test_a_good_host_passes(host_dirs) -> None:  # noqa: F811
    state, logs = Path(host_dirs["state_dir"]), Path(host_dirs["log_dir"])
    state.mkdir(mode=0o711)
    logs.mkdir(mode=0o711)
    ctl = ControllerDouble()
    await ctl.start()
    try:
        code, lines = await herdsman_check("--url", ctl.url, "--access-key", "agent", "--secret-key", "secret",
                                           "--state-dir", str(state), "--log-dir", str(logs),
                                           "--storage-pool", host_dirs["storage_pool"])
    finally:
        await ctl.stop()
    assert code == 0, lines
    assert lines["libvirtd"][0] == "ok" and "qemu:///system: libvirt 9." in lines["libvirtd"][1]
    assert lines["kvm"][0] in ("ok", "warn")  # this machine's kvm_pvm: warn, with the reason
    assert lines["state-dir"] == ("ok", f"libvirt-qemu:libvirt-qemu can traverse {state} (0711 root:root)")
    assert lines["log-dir"][0] == "ok"
    assert lines["storage-pool"][0] == "ok" and "not defined yet" in lines["storage-pool"][1]
    assert lines["network"][0] in ("ok", "warn") and "'default' is active" in lines["network"][1]
    assert lines["controller"][0] == "ok" and "accepted the keys (HTTP 200" in lines["controller"][1]
    assert lines["clock"][0] in ("ok", "warn")  # warn where no NTP runs, as here
    assert "behind the controller's" in lines["clock"][1] or "ahead of the controller's" in lines["clock"][1]
    assert lines["disk-space"][0] == "ok"


@needs_libvirtd
async def test_a_broken_host_fails_with_the_fix(host_dirs, system_conn) -> None:  # noqa: F811
    state, logs = Path(host_dirs["state_dir"]), Path(host_dirs["log_dir"])
    state.mkdir(mode=0o700)
    logs.mkdir(mode=0o711)
    elsewhere = state.parent / "elsewhere"
    pool = system_conn.storagePoolDefineXML(
        f"<pool type='dir'><name>{host_dirs['storage_pool']}</name><target><path>{elsewhere}</path></target></pool>", 0)
    ctl = ControllerDouble()
    await ctl.start()
    try:
        code, lines = await herdsman_check("--url", ctl.url, "--access-key", "agent", "--secret-key", "wrong",
                                           "--state-dir", str(state), "--log-dir", str(logs),
                                           "--storage-pool", host_dirs["storage_pool"])
    finally:
        await ctl.stop()
        pool.undefine()
    assert code == 1
    assert lines["state-dir"] == ("fail", f"{state} is 0700 root:root: libvirt-qemu:libvirt-qemu cannot traverse it, "
                                          "so qemu cannot open the VMs' disks, seeds and kernels below it  "
                                          f"fix: chmod o+x {state} (e.g. 0711: traversable, not listable)")
    status, text = lines["storage-pool"]
    assert status == "fail" and f"is at {elsewhere}, but this agent's state dir puts it at {state}/pool" in text
    assert lines["controller"] == ("fail", f"{ctl.url} refused the keys (HTTP 401)  fix: set CATTLE_ACCESS_KEY and "
                                           "CATTLE_SECRET_KEY to the API key pair the controller issued for this host")
    assert ctl.auth_failures and ctl.auth_failures[0][0] == "/v1"


@needs_libvirtd
async def test_an_unreachable_controller_and_a_missing_network_fail(host_dirs) -> None:  # noqa: F811
    missing = f"hmtest-none-{uuid.uuid4().hex[:6]}"
    code, lines = await herdsman_check("--url", "http://127.0.0.1:9/v1", "--state-dir", str(host_dirs["state_dir"]),
                                       "--log-dir", str(host_dirs["log_dir"]), "--network", missing)
    assert code == 1
    status, text = lines["controller"]
    assert status == "fail" and text.startswith("http://127.0.0.1:9/v1 is unreachable: ConnectError")
    status, text = lines["network"]
    assert status == "fail" and f"no libvirt network {missing!r}" in text and "default" in text
    assert lines["clock"][0] in ("ok", "warn") and "the controller's clock was not read" in lines["clock"][1]


async def test_unreachable_libvirtd_fails_and_skips_what_needs_it(tmp_path: Path) -> None:
    sock = tmp_path / "no-such.sock"
    code, lines = await herdsman_check("--libvirt-uri", f"qemu:///system?socket={sock}", "--state-dir",
                                       str(tmp_path / "state"))
    assert code == 1 and lines["libvirtd"][0] == "fail" and "fix: start libvirtd" in lines["libvirtd"][1]
    assert lines["storage-pool"] == ("warn", "not checked: libvirtd is unreachable")


# -- at start-up ---------------------------------------------------------------------------------
async def test_startup_logs_every_check(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ctl = ControllerDouble()
    await ctl.start()
    config = AgentConfig(url=ctl.url, access_key="agent", secret_key="secret", libvirt_uri="test:///default",
                         state_dir=tmp_path / "state", log_dir=tmp_path / "log")
    try:
        with caplog.at_level(logging.INFO, logger="herdsman.check"):
            checks = await log_host_checks(config)
    finally:
        await ctl.stop()
    records = {r.check: r for r in caplog.records if hasattr(r, "check")}
    assert {c.name for c in checks} == set(records) >= {"libvirtd", "storage-pool", "network", "controller", "clock"}
    assert records["controller"].status == "ok" and records["controller"].levelno == logging.INFO
    for record in records.values():
        assert record.levelno == {"ok": logging.INFO, "warn": logging.WARNING, "fail": logging.ERROR}[record.status]
    [done] = [r for r in caplog.records if r.getMessage() == "host checks done"]
    assert done.fail == 0 and done.ok >= 4


async def test_herdsman_run_logs_the_checks_at_start(tmp_path: Path) -> None:
    ctl = ControllerDouble()
    await ctl.start()
    agent = AgentProcess(ctl.url, tmp_path / "state", tmp_path / "log", uri="test:///default")
    agent.start()
    try:
        await ctl.wait_subscribed(timeout=60)
        for _ in range(200):
            if "host checks done" in agent.output():
                break
            await asyncio.sleep(0.1)
    finally:
        agent.kill(15)
        await ctl.stop()
    out = agent.output()
    assert "host checks done" in out, out
    assert "host check controller: ok" in out and "accepted the keys" in out

