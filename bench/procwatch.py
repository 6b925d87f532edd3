"""A real `herdsman run` process, and what it costs the host (psutil), for `scale`.

libvirt's test driver lives inside the process that opens it, so an agent process on
test:///default would see no VMs. It is pointed instead at a test-driver node file
(`test:///path/node.xml`) holding the agent-rendered domains, which it adopts at start-up
like domains already defined on a real host. The test driver keeps those domains in the
agent's own memory, which libvirtd would hold on a real host; a bare Python process that
only opens the same file is measured next to it so that share can be told apart.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import psutil

from bench.common import REPO

#: Opens the file, then hands the test driver's parsing garbage back as the agent does (agent/heap.py),
#: so its RSS is what the domains hold.
_BARE = ("import ctypes, libvirt, sys, time; c = libvirt.open(sys.argv[1]); n = len(c.listAllDomains(0)); "
         "ctypes.CDLL(None).malloc_trim(0); print(n, flush=True); time.sleep(3600)")


def write_node_file(path: Path, domain_xmls: list[str]) -> str:
    """A test-driver node file with these domains (all running at open); returns its URI."""
    with path.open("w", encoding="utf-8") as out:
        out.write("<node>\n")
        for xml in domain_xmls:
            out.write(xml)
        out.write("</node>\n")
    return "test://" + quote(str(path.resolve()))


@dataclass
class Usage:
    """RSS samples (bytes) and CPU seconds over a window."""

    rss: list[int] = field(default_factory=list)
    cpu_seconds: float = 0.0
    window: float = 0.0
    system_seconds: float = 0.0  # of cpu_seconds, in the kernel

    @property
    def cpu_percent(self) -> float:
        return 100 * self.cpu_seconds / self.window if self.window else float("nan")

    @property
    def system_percent(self) -> float:
        return 100 * self.system_seconds / self.window if self.window else float("nan")


async def sample(pids: dict[str, int], seconds: float, every: float = 1.0) -> dict[str, Usage]:
    """Sample RSS of each process every `every` seconds and its CPU time over `seconds`."""
    procs = {name: psutil.Process(pid) for name, pid in pids.items()}
    usage = {name: Usage() for name in procs}
    start_cpu = {name: _cpu(p) for name, p in procs.items()}
    start_system = {name: p.cpu_times().system for name, p in procs.items()}
    started = time.monotonic()
    while (elapsed := time.monotonic() - started) < seconds:
        for name, proc in procs.items():
            usage[name].rss.append(proc.memory_info().rss)
        await asyncio.sleep(min(every, max(0.0, seconds - elapsed)))
    window = time.monotonic() - started
    for name, proc in procs.items():
        usage[name].rss.append(proc.memory_info().rss)
        usage[name].cpu_seconds = _cpu(proc) - start_cpu[name]
        usage[name].system_seconds = proc.cpu_times().system - start_system[name]
        usage[name].window = window
    return usage


def _cpu(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return float(times.user + times.system)


class AgentProcess:
    """`python -m agent run` against the controller process, JSON logs to a file."""

    def __init__(self, url: str, uri: str, root: Path) -> None:
        self.log_path = root / "agent.log"
        self.args = [sys.executable, "-m", "agent", "run", "--url", url, "--access-key", "agent",
                     "--secret-key", "secret", "--libvirt-uri", uri, "--state-dir", str(root / "state"),
                     "--log-dir", str(root / "log"), "--domain-type", "qemu", "--log-format", "json"]
        self.proc: asyncio.subprocess.Process | None = None
        self.started = 0.0

    async def start(self) -> int:
        with self.log_path.open("ab") as log:
            self.started = time.perf_counter()
            self.proc = await asyncio.create_subprocess_exec(*self.args, cwd=REPO, stdout=log, stderr=log,
                                                             env={**os.environ, "PYTHONUNBUFFERED": "1"})
        return self.proc.pid

    async def stop(self) -> int | None:
        if self.proc is None or self.proc.returncode is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return await asyncio.wait_for(self.proc.wait(), 30)
        except TimeoutError:
            self.proc.kill()
            return await self.proc.wait()

    def log_records(self, message: str) -> list[dict[str, Any]]:
        return log_records(self.log_path, message)


def log_records(path: Path, message: str) -> list[dict[str, Any]]:
    """The JSON log records with this message (the agent's `--log-format json` lines)."""
    records = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("msg") == message:
            records.append(record)
    return records


class BareProcess:
    """Python + libvirt-python holding the same node file open, and nothing else."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> tuple[int, int]:
        """Start it; returns (pid, domains it sees) once the file is loaded."""
        self.proc = await asyncio.create_subprocess_exec(sys.executable, "-c", _BARE, self.uri,
                                                         stdout=asyncio.subprocess.PIPE)
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), 60)
        return self.proc.pid, int(line or b"-1")

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
