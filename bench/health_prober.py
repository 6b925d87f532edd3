"""The probing side of the `health` benchmark: one process per role, measured side by side.

    python -m bench.health_prober probe  --peer JSON --vms 1000 --interval-ms 2000 --http-every 10 --log FILE
    python -m bench.health_prober probe  --peer JSON --vms 0     (the same process, idle)
    python -m bench.health_prober bare   --peer JSON --rate 500 --http-every 10

`probe` runs what the agent runs for health: a HealthMonitor watching `vms` VMs (every
`http-every`-th one an HTTP check, the rest TCP), the HealthReporter posting transitions to
the peer's controller double through the real ControllerClient, and JSON logs to a file at
INFO, as the daemon logs. It prints `READY`, then `HEALTHY <n>` once every VM is healthy, and
on SIGTERM one `STATS {...}` line.

`bare` is the floor: the same connects (and HTTP requests) at the same rate from a plain
blocking loop, with no scheduler, state machine, event loop or reports.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import socket
import struct
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.health.addresses import ProbeAddresses
from agent.health.monitor import HealthChange, HealthMonitor
from agent.health.reporter import HealthReporter, client_post
from agent.health.state import Health
from agent.logs import configure_logging
from agent.protocol.client import ControllerClient, basic_auth
from agent.spec.policies import InstanceHealthCheck
from bench.health_peer import HEALTH_KEYS

HOST_UUID = "00000000-0000-4000-8000-0000000000be"
REQUEST_LINE = "GET /healthz HTTP/1.0"


class Counting:
    """Counts transitions; says when every VM is healthy."""

    def __init__(self, vms: int) -> None:
        self.vms = vms
        self.transitions: Counter[str] = Counter()
        self.healthy: set[str] = set()

    def health_changed(self, change: HealthChange) -> None:
        self.transitions[f"{change.transition.previous}->{change.transition.current}"] += 1
        if change.transition.current is Health.HEALTHY:
            self.healthy.add(change.instance_uuid)
            if len(self.healthy) == self.vms:
                print(f"HEALTHY {self.vms}", flush=True)
        else:
            self.healthy.discard(change.instance_uuid)

    def health_forgotten(self, instance_uuid: str) -> None:
        pass


async def probe(peer: dict[str, Any], vms: int, interval_ms: int, http_every: int, log: Path) -> None:
    with log.open("a") as stream:
        configure_logging("json", "INFO", stream)
        loop = asyncio.get_running_loop()
        # the agent's own per-probe lookup; its session form maps each VM's port 80 to a
        # listener of the peer, as qemu's forwarded ports would
        addresses = ProbeAddresses(None, session=True)
        checks: dict[str, InstanceHealthCheck] = {}
        for n in range(vms):
            uuid = f"00000000-0000-4000-8000-{n:012d}"
            http = http_every and n % http_every == 0
            pool = peer["http"] if http else peer["tcp"]
            host, port = pool[n % len(pool)]
            addresses.learn(uuid, docker_ports=[f"{host}:{port}:80/tcp"])
            checks[uuid] = InstanceHealthCheck.model_validate({
                "port": 80, "interval": interval_ms, "responseTimeout": 2000,
                **({"requestLine": REQUEST_LINE} if http else {})})
        probes = 0

        def address_of(uuid: str, port: int) -> tuple[str, int] | None:
            nonlocal probes
            probes += 1
            return addresses(uuid, port)

        client = ControllerClient(peer["url"], "bench-agent", "secret", event_names=["ping"])
        reporter = HealthReporter(client_post(client, basic_auth(*HEALTH_KEYS)), HOST_UUID)
        counting = Counting(vms)
        monitor = HealthMonitor(address_of, listeners=[reporter, counting], logger=logging.getLogger("herdsman.health"))
        for uuid, check in checks.items():
            monitor.watch(uuid, check, start_count=1)
        print("READY", flush=True)
        done = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, done.set)
        started = time.monotonic()
        await done.wait()
        elapsed = time.monotonic() - started
        monitor.close()
        pending = reporter.pending
        await reporter.close()
        await client.aclose()
        print("STATS " + json.dumps({"probes": probes, "seconds": round(elapsed, 3),
                                     "transitions": dict(counting.transitions), "unreported": pending}), flush=True)


def bare(peer: dict[str, Any], rate: float, http_every: int) -> None:
    """Blocking connect (+ request, status line) and reset-close, paced at `rate` per second."""
    linger = struct.pack("ii", 1, 0)
    request = b"GET /healthz HTTP/1.0\r\n\r\n"
    stop = False

    def on_signal(*_: Any) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    print("READY", flush=True)
    started = time.monotonic()
    n = failures = 0
    while not stop:
        http = http_every and n % http_every == 0
        pool = peer["http"] if http else peer["tcp"]
        host, port = pool[n % len(pool)]
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
        sock.settimeout(2.0)
        try:
            sock.connect((host, port))
            if http:
                sock.sendall(request)
                failures += not sock.recv(1024).startswith(b"HTTP/1.0 200")
        except OSError:
            failures += 1
        finally:
            sock.close()
        n += 1
        delay = started + n / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
    print("STATS " + json.dumps({"probes": n, "failures": failures, "seconds": round(time.monotonic() - started, 3)}),
          flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("role", choices=("probe", "bare"))
    parser.add_argument("--peer", required=True, help="the JSON the peer printed after READY")
    parser.add_argument("--vms", type=int, default=1000)
    parser.add_argument("--interval-ms", type=int, default=2000)
    parser.add_argument("--http-every", type=int, default=10)
    parser.add_argument("--rate", type=float, default=500.0)
    parser.add_argument("--log", type=Path, default=Path("/dev/null"))
    args = parser.parse_args()
    peer = json.loads(args.peer)
    if args.role == "probe":
        asyncio.run(probe(peer, args.vms, args.interval_ms, args.http_every, args.log))
    else:
        bare(peer, args.rate, args.http_every)


if __name__ == "__main__":
    main()
