"""`health`: what probing 1,000 VMs every 2 s costs the probing process, side by side with the
same process idle and with a bare loop doing the same connects (bench/README.md)."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import procwatch
from bench.common import REPO, Result, Target, fmt, print_table

VMS, INTERVAL_MS, HTTP_EVERY = 1000, 2000, 10
WARM_UP = 5.0  # after every VM is healthy: the burst of first reports is over


class _Child:
    """A `python -m bench.<module> ...` process that speaks in lines on stdout."""

    def __init__(self, *args: str) -> None:
        self.args = [sys.executable, "-m", *args]
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> int:
        self.proc = await asyncio.create_subprocess_exec(*self.args, cwd=REPO, stdout=asyncio.subprocess.PIPE)
        return self.proc.pid

    async def line(self, prefix: str, timeout: float) -> str:
        """The rest of the next line starting with `prefix`."""
        assert self.proc is not None and self.proc.stdout is not None
        async with asyncio.timeout(timeout):
            while True:
                raw = await self.proc.stdout.readline()
                if not raw:
                    raise RuntimeError(f"{' '.join(self.args[2:4])} exited before printing {prefix}")
                text = raw.decode().rstrip("\n")
                if text.startswith(prefix):
                    return text[len(prefix):].strip()

    async def stop(self, result: str | None = None) -> dict[str, Any]:
        """SIGTERM; the JSON after `result` if asked for."""
        if self.proc is None or self.proc.returncode is not None:
            return {}
        self.proc.send_signal(signal.SIGTERM)
        found: dict[str, Any] = {}
        try:
            if result:
                found = json.loads(await self.line(result, 30))
            await asyncio.wait_for(self.proc.wait(), 30)
        except (TimeoutError, RuntimeError):
            self.proc.kill()
            await self.proc.wait()
        return found


async def measure(vms: int, window: float) -> dict[str, Any]:
    peer = _Child("bench.health_peer")
    await peer.start()
    peer_json = await peer.line("READY", 30)
    rate = vms / (INTERVAL_MS / 1000)
    with tempfile.TemporaryDirectory(prefix="herdsman-bench-health-") as tmp:
        log = Path(tmp) / "prober.log"
        common = ("--peer", peer_json, "--interval-ms", str(INTERVAL_MS), "--http-every", str(HTTP_EVERY))
        probing = _Child("bench.health_prober", "probe", *common, "--vms", str(vms), "--log", str(log))
        idle = _Child("bench.health_prober", "probe", *common, "--vms", "0")
        bare = _Child("bench.health_prober", "bare", *common, "--rate", str(rate))
        try:
            pids = {"probing": await probing.start(), "idle": await idle.start()}
            await probing.line("READY", 60)
            await idle.line("READY", 60)
            started = time.monotonic()
            await probing.line("HEALTHY", 60)
            healthy_after = time.monotonic() - started
            pids["bare"] = await bare.start()
            await bare.line("READY", 30)
            await asyncio.sleep(WARM_UP)
            usage = await procwatch.sample(pids, window)
        finally:
            stats = await probing.stop("STATS")
            bare_stats = await bare.stop("STATS")
            await idle.stop()
            reports = await peer.stop("REPORTS")
        log_lines = sum(1 for line in log.read_text().splitlines() if '"health state changed"' in line)
    return {"usage": usage, "stats": stats, "bare": bare_stats, "reports": reports, "healthy_after": healthy_after,
            "log_lines": log_lines, "rate": rate}


async def run(quick: bool, shared: dict[str, Any]) -> Result:
    window = 15.0 if quick else 60.0
    m = await measure(VMS, window)
    usage, stats, bare_stats = m["usage"], m["stats"], m["bare"]
    probing, idle, bare = (usage[name].cpu_percent for name in ("probing", "idle", "bare"))
    added = probing - idle
    probe_rate = stats.get("probes", 0) / stats["seconds"] if stats.get("seconds") else float("nan")
    print_table(f"health: {VMS} VMs, {INTERVAL_MS} ms interval (every {HTTP_EVERY}th HTTP, the rest TCP), "
                f"{window:.0f} s window", ("process", "CPU % of a core", "of which kernel", "RSS max MiB"),
                [[name, fmt(usage[name].cpu_percent), fmt(usage[name].system_percent), fmt(max(usage[name].rss) / (1 << 20))]
                 for name in ("probing", "idle", "bare")])
    transitions = stats.get("transitions", {})
    print(f"\n  probes {probe_rate:.0f}/s (expected {m['rate']:.0f}/s); bare loop {bare_stats.get('probes', 0)} probes, "
          f"{bare_stats.get('failures')} failed; all {VMS} healthy {fmt(m['healthy_after'])} s after start; "
          f"transitions {transitions}; health log lines {m['log_lines']}; reports accepted "
          f"{m['reports'].get('accepted')}, unreported at the end {stats.get('unreported')}")
    notes = []
    if set(transitions) != {"initializing->healthy"}:
        notes.append(f"unexpected transitions (a false DOWN?): {transitions}")
    return Result(
        name="health",
        ratio=added / bare if bare else float("nan"),
        figures={
            "VMs": f"{VMS} ({VMS // HTTP_EVERY} HTTP)",
            "probes/s": f"{probe_rate:.0f}",
            "CPU % probing": f"{fmt(probing)} (kernel {fmt(usage['probing'].system_percent)})",
            "CPU % idle": fmt(idle),
            "CPU % added": fmt(added),
            "CPU % bare loop": f"{fmt(bare)} (kernel {fmt(usage['bare'].system_percent)})",
            "all healthy after s": fmt(m["healthy_after"]),
        },
        targets=[Target("CPU added by probing (probing - idle)", added, 5, " % of a core")],
        notes=notes,
    )
