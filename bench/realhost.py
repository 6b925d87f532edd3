"""What a real host sees: a `herdsman run` process on qemu:///system booting the test guest.

Two benchmarks share this module because they share the set-up (root, the real libvirtd, the
test guest, the agent as its own process, the controller double in the benchmark process):

- **pingload**: pings every 100 ms while 10 and then 30 VMs are activated at once. A ping is
  answered on the agent's event loop, so its latency is the loop's responsiveness while VMs
  start; the watchdog's WATCHDOG=1 datagrams (the agent runs with a 1 s watchdog here) show
  whether systemd would have seen it stall. Baseline: the same pings on the idle agent just
  before. Ratio: ping p99 while VMs start ÷ ping p99 idle.
- **realboot**: agent start-up (process start → subscribed), then activate → domain running for
  the first VM after start-up and for warm ones, side by side with `virsh create` of the same
  XML; once on the host as prepared (`/dev/kvm` root:kvm 0660, as udev leaves it) and once as a
  slow-probe host (`/dev/kvm` 0600: libvirt re-probes qemu on every capabilities lookup).
  Ratio: warm activate → running ÷ `virsh create` → running, on the prepared host.

The controller double runs in the benchmark process: the agent is a separate process, so the
double's work is not charged to it, and the benchmark's own loop is idle enough to time replies.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid as uuid_module
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import libvirt

from bench.common import REPO, SUMMARY_HEADER, Result, Summary, Target, fmt, print_table, summary_row
from tests.controller_double import ControllerDouble
from tests.libvirtd_fixtures import cleanup_test_host

URI = "qemu:///system"
ROOT = Path("/var/lib/herdsman-bench")
KVM = Path("/dev/kvm")


def _require_root(name: str) -> None:
    if os.geteuid() != 0:
        raise SystemExit(f"{name}: needs root for qemu:///system (run as root after scripts/libvirt-up)")
    try:
        libvirt.open(URI).close()
    except libvirt.libvirtError as exc:
        raise SystemExit(f"{name}: libvirtd is not running ({exc}); scripts/libvirt-up starts it") from None


def _guest_image(folder: Path) -> str:
    from tests.guest.build import ensure_guest, write_image_manifest

    manifest = folder / "image.json"
    write_image_manifest(ensure_guest(), manifest)
    return f"kernel:file://{manifest}"


def _instance(image: str, name: str) -> dict[str, Any]:
    return {"uuid": str(uuid_module.uuid4()), "name": name, "kind": "virtualMachine", "memoryMb": 128,
            "data": {"fields": {"vcpu": 1, "imageUuid": image, "hostname": name}}}


class WatchdogListener:
    """A NOTIFY_SOCKET the agent's watchdog pings: the largest gap between two pings."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / "notify.sock"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.path))
        self.sock.setblocking(False)
        self.pings: list[float] = []
        self._task: asyncio.Task[None] | None = None

    async def _receive(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            data = await loop.sock_recv(self.sock, 4096)
            if b"WATCHDOG=1" in data:
                self.pings.append(time.monotonic())

    def start(self) -> None:
        self._task = asyncio.create_task(self._receive())

    def max_gap(self, since: float, until: float) -> float:
        times = [t for t in self.pings if since <= t <= until]
        return max((b - a for a, b in zip(times, times[1:])), default=float("nan"))

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self.sock.close()


@dataclass
class AgentRun:
    """One `herdsman run` process on qemu:///system with its own state dir and pool."""

    ctl: ControllerDouble
    root: Path
    token: str
    watchdog_usec: int = 1_000_000
    proc: asyncio.subprocess.Process | None = None
    watchdog: WatchdogListener | None = None
    started: float = 0.0
    subscribed_after: float = float("nan")
    disconnects: int = 0

    @property
    def pool(self) -> str:
        return f"hmbench-{self.token}"

    async def start(self) -> None:
        self.watchdog = WatchdogListener(self.root)
        self.watchdog.start()
        args = [sys.executable, "-m", "agent", "run", "--url", self.ctl.url, "--access-key", "agent",
                "--secret-key", "secret", "--libvirt-uri", URI, "--state-dir", str(self.root / "state"),
                "--log-dir", str(self.root / "log"), "--storage-pool", self.pool, "--domain-type", "qemu",
                "--stream-listen", "127.0.0.1:0", "--log-format", "json"]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "NOTIFY_SOCKET": str(self.watchdog.path),
               "WATCHDOG_USEC": str(self.watchdog_usec)}
        env.pop("WATCHDOG_PID", None)
        log = (self.root / "agent.log").open("ab")
        subscribed_before = len(self.ctl.subscriptions)
        self.started = time.perf_counter()
        self.proc = await asyncio.create_subprocess_exec(*args, cwd=REPO, stdout=log, stderr=log, env=env)
        log.close()
        await self.ctl.wait_subscribed(timeout=300, count=subscribed_before + 1)
        self.subscribed_after = time.perf_counter() - self.started

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), 30)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        if self.watchdog is not None:
            self.watchdog.close()

    async def request(self, name: str, inst: dict[str, Any], timeout: float = 600) -> tuple[float, dict[str, Any]]:
        """Send one compute.instance.* event; seconds to its final reply, and the reply."""
        data: dict[str, Any] = {"instanceHostMap": {"instance": inst}}
        if name in ("deactivate", "remove"):
            data["processData"] = {"timeout": 0}
        started = time.perf_counter()
        reply = await self.send(f"compute.instance.{name}", data, resource_type="instanceHostMap",
                                resource_id=f"b-{inst['uuid'][:8]}", timeout=timeout)
        return time.perf_counter() - started, reply

    async def send(self, name: str, data: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        """A request; when the agent is not subscribed (it dropped the websocket: a loop blocked
        past the keepalive), wait for it to come back and send again, as Cattle retries."""
        while True:
            try:
                return await self.ctl.request(name, data, **kwargs)
            except RuntimeError:  # no subscriber
                self.disconnects += 1
                await self.ctl.wait_subscribed(timeout=300, count=len(self.ctl.subscriptions) + 1)


@contextlib.asynccontextmanager
async def agent_on_real_host(watchdog_usec: int = 1_000_000) -> AsyncIterator[tuple[AgentRun, str]]:
    """A running agent process, the test guest's image reference; everything removed after."""
    ROOT.mkdir(parents=True, exist_ok=True, mode=0o755)
    os.chmod(ROOT, 0o755)
    token = uuid_module.uuid4().hex[:8]
    root = Path(tempfile.mkdtemp(prefix=f"{token}-", dir=ROOT))
    os.chmod(root, 0o755)
    conn = libvirt.open(URI)
    ctl = ControllerDouble()
    await ctl.start()
    run = AgentRun(ctl, root, token, watchdog_usec=watchdog_usec)
    try:
        image = _guest_image(root / "images")
        await run.start()
        yield run, image
    finally:
        await run.stop()
        await ctl.stop()
        cleanup_test_host(conn, root, run.pool)
        conn.close()


# -- pingload --------------------------------------------------------------------------------

@dataclass
class Pinger:
    """Pings every `every` seconds (instances on every third, as Cattle does); latencies by phase."""

    run: AgentRun
    every: float = 0.1
    phase: str = "idle"
    latencies: dict[str, list[float]] = field(default_factory=dict)
    failures: int = 0

    async def loop(self) -> None:
        n = 0
        while True:
            n += 1
            options = {"instances": n % 3 == 0}
            phase = self.phase
            started = time.perf_counter()
            try:
                reply = await self.run.send("ping", {"options": options}, resource_type="agent",
                                            resource_id="1", timeout=30)
                if reply.get("transitioning") == "error":
                    self.failures += 1
                else:
                    elapsed = time.perf_counter() - started
                    self.latencies.setdefault(phase, []).append(elapsed)
                    kind = "with instances" if options["instances"] else "host only"
                    self.latencies.setdefault(f"{phase}, {kind}", []).append(elapsed)
            except TimeoutError:
                self.failures += 1
            await asyncio.sleep(max(0.0, self.every - (time.perf_counter() - started)))


async def _wave(run: AgentRun, pinger: Pinger, image: str, count: int) -> dict[str, Any]:
    """`count` activates at once, then purges; pings go on throughout."""
    instances = [_instance(image, f"load{count}-{i}") for i in range(count)]
    pinger.phase = f"{count} starting"
    since = time.monotonic()
    results = await asyncio.gather(*(run.request("activate", inst) for inst in instances))
    until = time.monotonic()
    errors = [r.get("transitioningMessage") for _, r in results if r.get("transitioning") == "error"]
    pinger.phase = f"{count} purging"
    await asyncio.gather(*(run.request("purge", inst) for inst in instances))
    pinger.phase = "idle"
    assert run.watchdog is not None
    return {"activate": [t for t, _ in results], "errors": errors,
            "watchdog gap": run.watchdog.max_gap(since, until), "window": until - since}


async def pingload(quick: bool, shared: dict[str, Any]) -> Result:
    _require_root("pingload")
    levels = [10] if quick else [10, 30]
    async with agent_on_real_host() as (run, image):
        # one VM first: the image cache and libvirt's caches are warm before anything is timed
        warm = _instance(image, "warm")
        await run.request("activate", warm)
        await run.request("purge", warm)
        pinger = Pinger(run)
        task = asyncio.create_task(pinger.loop())
        await asyncio.sleep(5 if quick else 10)
        waves = {}
        for count in levels:
            waves[count] = await _wave(run, pinger, image, count)
            await asyncio.sleep(3)
        task.cancel()
        assert run.watchdog is not None
        idle_gap = run.watchdog.max_gap(0, time.monotonic())
    rows = [summary_row(f"ping, {phase}", values) for phase, values in sorted(pinger.latencies.items())]
    rows += [summary_row(f"activate, {count} at once", wave["activate"]) for count, wave in waves.items()]
    print_table("pingload: pings every 100 ms while VMs start (real libvirtd, TCG)", SUMMARY_HEADER, rows)
    idle = Summary.of([v * 1000 for v in pinger.latencies.get("idle", [])])
    figures: dict[str, str] = {"ping p99 idle ms": fmt(idle.p99)}
    targets = []
    worst = idle.p99
    for count, wave in waves.items():
        loaded = Summary.of([v * 1000 for v in pinger.latencies.get(f"{count} starting", [])])
        worst = max(worst, loaded.p99)
        figures[f"ping p50/p99 ms, {count} starting"] = f"{fmt(loaded.median)}/{fmt(loaded.p99)}"
        figures[f"watchdog max gap s, {count} starting"] = fmt(wave["watchdog gap"])
        figures[f"activate p50 s, {count} at once"] = fmt(Summary.of(wave["activate"]).median)
        if wave["errors"]:
            figures[f"errors, {count}"] = str(len(wave["errors"]))
        targets.append(Target(f"ping p99 while {count} VMs start", loaded.p99, 100, "ms"))
        targets.append(Target(f"watchdog gap while {count} VMs start (1 s watchdog)", wave["watchdog gap"], 1.0, "s"))
    figures["ping failures"] = str(pinger.failures)
    figures["websocket drops"] = str(run.disconnects)
    return Result(name="pingload", ratio=worst / idle.p99 if idle.p99 else float("nan"), figures=figures,
                  targets=targets, notes=[f"overall max watchdog gap {fmt(idle_gap)} s"])


# -- realboot --------------------------------------------------------------------------------

@contextlib.contextmanager
def kvm_mode(mode: int, group: str | None) -> Any:
    """Temporarily give /dev/kvm this mode (and group): 0600 makes a slow-probe host."""
    if not KVM.exists():
        yield False
        return
    st = KVM.stat()
    try:
        if group is not None:
            shutil.chown(KVM, group=group)
        os.chmod(KVM, mode)
        yield True
    finally:
        os.chown(KVM, st.st_uid, st.st_gid)
        os.chmod(KVM, st.st_mode & 0o7777)


async def _virsh_create(conn: libvirt.virConnect, run: AgentRun, inst: dict[str, Any]) -> float:
    """Remove the agent's VM (its volumes and seed stay) and boot the same XML with virsh."""
    xml = conn.lookupByUUIDString(inst["uuid"]).XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    await run.request("remove", inst)
    path = run.root / f"{inst['uuid']}.xml"
    path.write_text(xml)
    started = time.perf_counter()
    await asyncio.to_thread(subprocess.run, ["virsh", "-c", URI, "create", str(path)], check=True,
                            capture_output=True)
    elapsed = time.perf_counter() - started
    await asyncio.to_thread(subprocess.run, ["virsh", "-c", URI, "destroy", inst["uuid"]], check=True,
                            capture_output=True)
    return elapsed


async def _boot_rounds(rounds: int) -> dict[str, list[float]]:
    found: dict[str, list[float]] = {"start-up → subscribed": [], "first activate → running": [],
                                     "warm activate → running": [], "virsh create → running": []}
    conn = libvirt.open(URI)
    try:
        async with agent_on_real_host(watchdog_usec=0) as (run, image):
            found["start-up → subscribed"].append(run.subscribed_after)
            for i in range(rounds + 1):
                inst = _instance(image, f"boot{i}")
                seconds, reply = await run.request("activate", inst)
                if reply.get("transitioning") == "error":
                    raise RuntimeError(reply.get("transitioningMessage"))
                found["first activate → running" if i == 0 else "warm activate → running"].append(seconds)
                if i > 0:
                    found["virsh create → running"].append(await _virsh_create(conn, run, inst))
                await run.request("purge", inst)
    finally:
        conn.close()
    return found


async def realboot(quick: bool, shared: dict[str, Any]) -> Result:
    _require_root("realboot")
    rounds = 2 if quick else 4
    prepared = await _boot_rounds(rounds)
    with kvm_mode(0o600, None) as changed:
        slow = await _boot_rounds(1) if changed else {}
    rows = [summary_row(k, v) for k, v in prepared.items()]
    rows += [summary_row(f"{k} (kvm 0600)", v) for k, v in slow.items()]
    print_table(f"realboot: agent process on qemu:///system, {rounds} warm rounds", SUMMARY_HEADER, rows)
    warm = Summary.of(prepared["warm activate → running"]).median
    virsh = Summary.of(prepared["virsh create → running"]).median
    figures = {f"{k} s": fmt(Summary.of(v).median) for k, v in prepared.items()}
    figures.update({f"{k} s (kvm 0600)": fmt(Summary.of(v).median) for k, v in slow.items() if v})
    targets = [Target("warm activate → running, agent/virsh create", warm / virsh, 1.5, "×")]
    if slow:
        targets.append(Target("first activate → running on a slow-probe host",
                              Summary.of(slow["first activate → running"]).median, 15, "s"))
    return Result(name="realboot", ratio=warm / virsh, figures=figures, targets=targets,
                  notes=["virsh create reuses the agent's volumes and seed; the agent's time includes them"])
