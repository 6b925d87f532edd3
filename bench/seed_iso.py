"""seed: the NoCloud seed ISO built in-process (pycdlib) against the genisoimage binary.

A wrapper around bench/seed.py's `measure()` (interleaved runs of both builders on the same
three files) and `measure_write()` (the agent's whole path: render, build, fsync'ed temp
file, rename), so the comparison also lands in the suite's table and RESULTS.md.
"""

from __future__ import annotations

import shutil
import statistics
from typing import Any

from bench import seed
from bench.common import SUMMARY_HEADER, Result, Target, fmt, print_table, summary_row


async def run(quick: bool, shared: dict[str, Any]) -> Result:
    repeats = 15 if quick else 50
    if shutil.which("genisoimage") is None:
        raise SystemExit("seed: genisoimage is not installed (apt-get install genisoimage)")
    found = seed.measure(repeats)
    write = seed.measure_write(repeats)
    rows = [summary_row("pycdlib (agent)", found["ours"]),
            summary_row("genisoimage", found["genisoimage"]),
            summary_row("write_seed (agent path)", write)]
    print_table(f"seed: {repeats} interleaved builds of the same NoCloud seed", SUMMARY_HEADER, rows)
    ours, theirs = statistics.median(found["ours"]), statistics.median(found["genisoimage"])
    return Result(
        name="seed",
        ratio=ours / theirs,
        figures={"pycdlib ms": fmt(ours * 1000), "genisoimage ms": fmt(theirs * 1000),
                 "write_seed ms": fmt(statistics.median(write) * 1000)},
        targets=[Target("pycdlib ÷ genisoimage (median)", ours / theirs, 1.0, "×")],
    )
