"""sd_notify against real AF_UNIX datagram sockets, and the unit file as systemd reads it."""

from __future__ import annotations

import asyncio
import configparser
import itertools
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.systemd import Notifier

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "herdsman.service"
ENV_EXAMPLE = ROOT / "systemd" / "herdsman.env.example"


class Manager:
    """The service manager's end: a bound datagram socket and a thread that timestamps
    every datagram as it arrives (a thread, so it keeps receiving while the loop blocks)."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.settimeout(0.02)
        self.received: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            self.received.append((time.monotonic(), data.decode()))

    def messages(self, count: int = 1, timeout: float = 2.0) -> list[str]:
        deadline = time.monotonic() + timeout
        while len(self.received) < count and time.monotonic() < deadline:
            time.sleep(0.005)
        return [m for _, m in self.received]

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


@pytest.fixture
def path_socket() -> Iterator[tuple[str, Manager]]:
    # Short directory: AF_UNIX paths are limited to 107 bytes.
    with tempfile.TemporaryDirectory(prefix="hm-", dir="/tmp") as tmp:
        address = os.path.join(tmp, "notify")
        manager = Manager(address)
        yield address, manager
        manager.close()


@pytest.fixture
def abstract_socket() -> Iterator[tuple[str, Manager]]:
    name = f"herdsman-test-{uuid.uuid4().hex}"
    manager = Manager("\0" + name)
    yield "@" + name, manager
    manager.close()


def test_ready_and_status_arrive_as_sent(path_socket: tuple[str, Manager]) -> None:
    address, manager = path_socket
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": address})
    assert notifier.enabled and notifier.watchdog_interval is None
    notifier.ready("subscribed to controller")
    notifier.status("3 VMs running")
    notifier.stopping()
    notifier.ready()
    assert manager.messages(4) == [
        "READY=1\nSTATUS=subscribed to controller",
        "STATUS=3 VMs running",
        "STOPPING=1",
        "READY=1",
    ]
    notifier.close()


def test_abstract_namespace_socket(abstract_socket: tuple[str, Manager]) -> None:
    address, manager = abstract_socket
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": address})
    notifier.ready("up")
    assert manager.messages(1) == ["READY=1\nSTATUS=up"]


def test_a_value_cannot_forge_another_field(path_socket: tuple[str, Manager]) -> None:
    address, manager = path_socket
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": address})
    notifier.status("VM web-1\nREADY=1\r\nMAINPID=1")
    notifier.notify(**{"bad-key": "x", "STATUS": "ok"})
    assert manager.messages(2) == ["STATUS=VM web-1 READY=1  MAINPID=1", "STATUS=ok"]


async def test_watchdog_pings_at_half_the_timeout(path_socket: tuple[str, Manager]) -> None:
    address, manager = path_socket
    environ = {
        "NOTIFY_SOCKET": address,
        "WATCHDOG_USEC": "200000",
        "WATCHDOG_PID": str(os.getpid()),
    }
    notifier = Notifier.from_environ(environ)
    assert notifier.watchdog_interval == pytest.approx(0.1)
    start = time.monotonic()
    task = asyncio.create_task(notifier.run_watchdog())
    await asyncio.sleep(0.75)
    task.cancel()
    stamps = [t for t, m in manager.received if m == "WATCHDOG=1"]
    assert 6 <= len(stamps) <= 8, stamps
    gaps = [b - a for a, b in itertools.pairwise([start, *stamps])]
    assert min(gaps) >= 0.09
    assert sum(gaps) / len(gaps) == pytest.approx(0.1, abs=0.03)


async def test_watchdog_meant_for_another_process_is_ignored(
    path_socket: tuple[str, Manager],
) -> None:
    address, manager = path_socket
    environ = {
        "NOTIFY_SOCKET": address,
        "WATCHDOG_USEC": "100000",
        "WATCHDOG_PID": str(os.getppid()),
    }
    notifier = Notifier.from_environ(environ)
    assert notifier.enabled and notifier.watchdog_interval is None
    await asyncio.wait_for(notifier.run_watchdog(), timeout=0.5)  # returns at once
    await asyncio.sleep(0.2)
    assert manager.received == []


async def test_no_notify_socket_is_a_silent_no_op() -> None:
    notifier = Notifier.from_environ({"WATCHDOG_USEC": "100000"})
    assert not notifier.enabled and notifier.watchdog_interval is None
    notifier.ready("x")
    notifier.status("y")
    notifier.watchdog()
    await asyncio.wait_for(notifier.run_watchdog(), timeout=0.5)
    assert not Notifier.from_environ({"NOTIFY_SOCKET": "vsock:2:1234"}).enabled


async def test_a_blocked_loop_sends_no_ping(path_socket: tuple[str, Manager]) -> None:
    address, manager = path_socket
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "100000"})
    task = asyncio.create_task(notifier.run_watchdog())
    await asyncio.sleep(0.3)
    assert len(manager.received) >= 3  # pinging every 50 ms while the loop runs
    blocked_from = time.monotonic()
    time.sleep(0.6)  # a blocking call on the event loop
    blocked_until = time.monotonic()
    await asyncio.sleep(0.3)
    task.cancel()
    during = [t for t, _ in manager.received if blocked_from + 0.05 < t < blocked_until]
    after = [t for t, _ in manager.received if t >= blocked_until]
    assert during == []
    assert len(after) >= 3  # pings resume once the loop runs again


def test_a_vanished_or_full_manager_never_raises_nor_blocks(
    path_socket: tuple[str, Manager], caplog: pytest.LogCaptureFixture
) -> None:
    address, manager = path_socket
    sender = Notifier.from_environ({"NOTIFY_SOCKET": address})
    manager._stop.set()  # stop reading: the receive queue fills up
    manager._thread.join()
    started = time.monotonic()
    for i in range(5000):
        sender.status(f"update {i}")
    assert time.monotonic() - started < 2.0
    os.unlink(address)  # the manager goes away altogether
    sender.ready("still fine")
    sender.close()
    failures = [r for r in caplog.records if r.name == "agent.systemd" and "failed" in r.message]
    assert len(failures) == 1  # logged once per outage, not once per datagram


async def test_ready_sent_while_the_managers_queue_is_full_still_arrives(path_socket: tuple[str, Manager]) -> None:
    """The queue holds 10 datagrams (net.unix.max_dgram_qlen): watchdog pings sent while the
    manager was slow to read must not cost the READY=1 that a Type=notify start waits for."""
    address, manager = path_socket
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": address})
    manager._stop.set()  # stop reading: the receive queue fills up
    manager._thread.join()
    for _ in range(50):
        notifier.watchdog()
    notifier.ready("subscribed")
    notifier.stopping()
    await asyncio.sleep(0.3)  # still full: kept and sent again
    manager.sock.settimeout(0.5)
    received = []
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not any("STOPPING=1" in m for m in received):
        try:
            received.append(manager.sock.recv(65536).decode())
        except TimeoutError:
            pass
        await asyncio.sleep(0)  # the resend runs on this loop
    states = [m for m in received if "WATCHDOG" not in m]
    assert states == ["READY=1\nSTATUS=subscribed", "STOPPING=1"]
    notifier.close()


# --- the unit file ---------------------------------------------------------------------


def _unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=True)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    parser.read_string(UNIT.read_text())
    return parser


def test_unit_settings() -> None:
    unit = _unit()
    u, s = unit["Unit"], unit["Service"]
    assert "libvirtd.service" in u["Wants"].split() and "Requires" not in u
    assert {"libvirtd.service", "virtlogd.service", "network-online.target"} <= set(
        u["After"].split()
    )
    assert "network-online.target" in u["Wants"].split()
    assert (s["Type"], s["NotifyAccess"]) == ("notify", "main")
    assert s["ExecStart"] == "/usr/local/bin/herdsman run"
    assert s["EnvironmentFile"] == "-/etc/herdsman/herdsman.env"
    assert (s["Restart"], s["RestartSec"], s["WatchdogSec"]) == ("on-failure", "2", "30")
    assert int(s["TimeoutStartSec"]) >= 120  # waits for the first controller subscription
    assert s["KillMode"] == "process"
    assert (s["StateDirectory"], s["LogsDirectory"]) == ("herdsman", "herdsman")
    assert s["ProtectSystem"] == "strict"
    writable = {p.lstrip("-") for p in s["ReadWritePaths"].split()}
    assert {
        "/var/lib/herdsman",
        "/var/log/herdsman",
        "/var/lib/libvirt/images",
        "/run/libvirt",
        "/proc/sys/net/ipv4/conf",  # route_localnet for ports published on 127.0.0.1
    } <= writable
    assert set(s["RestrictAddressFamilies"].split()) == {
        "AF_UNIX",
        "AF_INET",
        "AF_INET6",
        "AF_NETLINK",
    }
    for key in (
        "NoNewPrivileges",
        "ProtectHome",
        "PrivateTmp",
        "ProtectKernelTunables",
        "ProtectKernelModules",
        "LockPersonality",
        "MemoryDenyWriteExecute",
    ):
        assert s[key] == "yes", key
    assert unit["Install"]["WantedBy"] == "multi-user.target"


def test_every_unit_setting_is_explained() -> None:
    """Each group of [Service] settings sits right under a comment saying why."""
    previous = ""
    section = ""
    for line in UNIT.read_text().splitlines():
        if line.startswith("["):
            section = line
        elif section == "[Service]" and line and not line.startswith("#"):
            assert previous.strip() and not previous.startswith("["), f"unexplained: {line}"
        previous = line


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    # verify checks that ExecStart is executable: point it at this checkout's console script,
    # as a virtualenv install would.
    herdsman = Path(sys.executable).parent / "herdsman"
    if not herdsman.exists():
        pytest.skip("herdsman console script not installed in this environment")
    text = UNIT.read_text().replace("ExecStart=/usr/local/bin/herdsman", f"ExecStart={herdsman}")
    (tmp_path / "herdsman.service").write_text(text)
    result = subprocess.run(
        ["systemd-analyze", "verify", str(tmp_path / "herdsman.service")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    complaints = [ln for ln in (result.stdout + result.stderr).splitlines() if "herdsman" in ln]
    assert result.returncode == 0 and complaints == [], result.stdout + result.stderr


def test_unit_environment_makes_a_watchdog_kill_print_the_stuck_stack() -> None:
    """WatchdogSec kills with SIGABRT; the unit's Environment= must make that show where
    the process was stuck."""
    env = dict(os.environ)
    env.update(kv.split("=", 1) for kv in shlex.split(_unit()["Service"]["Environment"]))
    code = textwrap.dedent(
        """
        import time
        def stuck_in_a_blocking_call():
            print("up", flush=True)  # from inside, so the signal cannot land before the call
            time.sleep(30)
        stuck_in_a_blocking_call()
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "up\n"
        proc.send_signal(signal.SIGABRT)
        _, err = proc.communicate(timeout=10)
    finally:
        proc.kill()
        proc.wait()
    assert "Fatal Python error: Aborted" in err
    assert "stuck_in_a_blocking_call" in err


MDWE_PROBE = textwrap.dedent(
    """
    import ctypes, mmap, os, sys
    libc = ctypes.CDLL(None, use_errno=True)
    PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 1
    if libc.prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0:
        sys.exit(77)
    try:
        mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
        sys.exit("W+X mapping was allowed: MDWE not in force")
    except PermissionError:
        pass
    import asyncio, json, ssl
    import httpx, jwt, libvirt, lxml.etree, psutil, pydantic, websockets
    from cryptography.hazmat.primitives.asymmetric import ec
    from agent.hostinfo import host_info
    from agent.logs import configure_logging
    doc = lxml.etree.fromstring(b"<domain type='qemu'><name>x</name></domain>")
    assert doc.findtext("name") == "x"
    key = ec.generate_private_key(ec.SECP256R1())
    token = jwt.encode({"hostUuid": "h"}, key, algorithm="ES256")
    assert jwt.decode(token, key.public_key(), algorithms=["ES256"])["hostUuid"] == "h"
    class M(pydantic.BaseModel):
        vcpu: int
    assert M.model_validate({"vcpu": "2"}).vcpu == 2
    ssl.create_default_context()
    libvirt.registerErrorHandler(lambda *a: None, None)
    conn = libvirt.open("test:///default")  # the client library's in-process driver
    assert conn.lookupByName("test").XMLDesc().startswith("<domain")
    conn.close()
    uris = ["test:///default"]
    if os.path.exists("/run/libvirt/libvirt-sock"):  # the RPC client, against libvirtd
        try:
            conn = libvirt.open("qemu:///system")
        except libvirt.libvirtError as exc:  # libvirtd restarting: not what this probe checks
            print("qemu:///system unreachable:", exc, file=sys.stderr)
        else:
            conn.listAllDomains()
            assert conn.getLibVersion() > 0
            conn.close()
            uris.append("qemu:///system")
    info = host_info(libvirt_version="x", qemu_version="y", domain_type="qemu", disk_paths=["/"])
    json.dumps(info)
    async def roundtrip():
        async def echo(ws):
            async for message in ws:
                await ws.send(message)
        async with websockets.serve(echo, "127.0.0.1", 0) as server:
            port = server.sockets[0].getsockname()[1]
            async with websockets.connect(f"ws://127.0.0.1:{port}") as ws:
                await ws.send("ping")
                assert await ws.recv() == "ping"
    asyncio.run(roundtrip())
    print("ok", " ".join(uris))
    """
)


def test_runtime_tolerates_memory_deny_write_execute() -> None:
    """The unit sets MemoryDenyWriteExecute=yes. The kernel's own MDWE (prctl, Linux >= 6.3)
    applies the same rule - no W+X mapping, no gaining exec - so the agent's libraries are
    loaded and exercised under it, including the libvirt client on a real connection."""
    result = subprocess.run(
        [sys.executable, "-c", MDWE_PROBE],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    if result.returncode == 77:
        pytest.skip("kernel without PR_SET_MDWE")
    assert result.returncode == 0 and result.stdout.startswith("ok"), result.stdout + result.stderr


def test_env_example_documents_every_setting() -> None:
    from agent.config import SETTINGS

    text = ENV_EXAMPLE.read_text()
    lines = text.splitlines()
    expected = {setting.env for setting in SETTINGS.values()}
    found = {}
    for i, line in enumerate(lines):
        body = line.removeprefix("#")
        key, sep, _ = body.partition("=")
        if sep and key.isidentifier() and key.isupper():
            found[key] = i
    assert set(found) == expected
    for key, i in found.items():
        above = lines[i - 1]
        assert above.startswith("# ") or above.lstrip("#").partition("=")[0] in found, key
    assert "#HERDSMAN_STATE_DIR=/var/lib/herdsman" in lines
    assert "#HERDSMAN_NETWORK=default" in lines
    assert "#HERDSMAN_STORAGE_POOL=herdsman" in lines
