"""`python -m bench [--quick] [--no-record] [NAME...]`: run benchmarks side by side.

Each benchmark prints its table, its targets and one final line `NAME: ratio=X (agent/baseline)`,
and appends a row to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

from bench import activate, boot, console, health, metrics, migrate, ports, realhost, render, scale, seed_iso, slowprobe
from bench.common import RESULTS, Result, append_result, fmt, git_commit, machine

Benchmark = Callable[[bool, dict[str, Any]], Awaitable[Result]]

BENCHMARKS: dict[str, Benchmark] = {
    "activate": activate.run,
    "render": render.run,
    "scale": scale.run,
    "seed": seed_iso.run,
    "boot": boot.run,
    "console": console.run,
    "metrics": metrics.run,
    "ports": ports.run,
    "realboot": realhost.realboot,
    "pingload": realhost.pingload,
    "slowprobe": slowprobe.run,
    "health": health.run,
    "migrate": migrate.run,
}


async def main(names: list[str], quick: bool, record: bool, command: str) -> int:
    started = datetime.datetime.now(datetime.UTC)
    commit, host = git_commit(), machine()
    print(f"herdsman benchmarks — {host}; commit {commit}; {started:%Y-%m-%d %H:%M} UTC{' (quick)' if quick else ''}")
    shared: dict[str, Any] = {}
    missed = 0
    for name in names:
        print(f"\n=== {name} ===")
        t0 = time.monotonic()
        try:
            result = await BENCHMARKS[name](quick, shared)
        except SystemExit as exc:  # a benchmark this machine cannot run (boot/console need root)
            print(f"{name}: skipped: {exc}", flush=True)
            continue
        for note in result.notes:
            print(f"  note: {note}")
        for target in result.targets:
            print(f"  target: {target.describe()}")
            missed += not target.ok
        print(f"  ({time.monotonic() - t0:.0f} s)")
        if record:
            append_result(result, started=started, commit=commit, host=host, command=command)
        print(f"{name}: ratio={fmt(result.ratio)} (agent/baseline)", flush=True)
    if record:
        print(f"\nrecorded in {RESULTS}")
    return 0


def cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"benchmarks to run (default all: {', '.join(BENCHMARKS)})")
    parser.add_argument("--quick", action="store_true", help="smaller counts and a 15 s idle window (rows marked quick)")
    parser.add_argument("--no-record", action="store_true", help="do not append to bench/RESULTS.md")
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    command = " ".join(["python -m bench", *argv])
    return asyncio.run(main(args.names or list(BENCHMARKS), args.quick, not args.no_record, command))


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
