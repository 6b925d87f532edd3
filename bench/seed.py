"""Seed ISO build time: pycdlib in-process (ours) against the genisoimage binary.

    python bench/seed.py [REPEATS]

Both build the same three files (a full seed: multipart user-data, meta-data,
network-config for two NICs) into an ISO with label `cidata`, Rock Ridge and Joliet.
genisoimage's time includes what using it costs an agent: writing the files to a temp dir,
the subprocess, and reading the image back. The two are interleaved run by run so that
load from anything else on the host falls on both alike. `write_seed` (render, build,
fsync'ed temp file, rename; a new instance id each run so every run rebuilds) is printed
for reference; the ratio compares the two builders only.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script from anywhere: make `drivers` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from drivers.libvirt.seed import (
    SeedInputs,
    build_seed_iso,
    render_seed_files,
    write_seed,
)

INPUTS = SeedInputs(
    instance_id="1b4e28ba-2fa1-11d2-883f-0016d3cca427",
    hostname="web",
    domain_name="example.com",
    userdata="#cloud-config\npackages: [nginx]\nruncmd:\n  - [systemctl, start, nginx]\n" * 20,
    dns=("192.0.2.53", "2001:db8::53"),
    dns_search=("example.com",),
    extra_hosts=(("db", "10.0.0.5"), ("cache", "10.0.0.6")),
    macs=("52:54:00:aa:bb:cc", "52:54:00:00:00:01"),
)


def _genisoimage(files: dict[str, bytes]) -> bytes:
    with tempfile.TemporaryDirectory(prefix="herdsman-bench-seed-") as tmp:
        root = Path(tmp)
        paths = []
        for name, data in files.items():
            (root / name).write_bytes(data)
            paths.append(str(root / name))
        out = root / "seed.iso"
        subprocess.run(
            ["genisoimage", "-quiet", "-V", "cidata", "-J", "-r", "-o", str(out), *paths],
            check=True,
            capture_output=True,
        )
        return out.read_bytes()


def measure(repeats: int = 50) -> dict[str, list[float]]:
    """Per-run seconds of each builder over `repeats` interleaved runs (after a warm-up)."""
    files = render_seed_files(INPUTS)
    build_seed_iso(files)
    _genisoimage(files)
    ours: list[float] = []
    baseline: list[float] = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        build_seed_iso(files)
        t1 = time.perf_counter()
        _genisoimage(files)
        t2 = time.perf_counter()
        ours.append(t1 - t0)
        baseline.append(t2 - t1)
    return {"ours": ours, "genisoimage": baseline}


def measure_write(repeats: int = 50) -> list[float]:
    """Per-run seconds of the whole agent path: render, build, temp file, fsync, rename."""
    times: list[float] = []
    with tempfile.TemporaryDirectory(prefix="herdsman-bench-seed-") as tmp:
        path = Path(tmp) / "seed.iso"
        for i in range(repeats + 1):
            inputs = SeedInputs(**{**INPUTS.__dict__, "instance_id": f"bench-{i}"})
            t0 = time.perf_counter()
            write_seed(path, inputs)
            times.append(time.perf_counter() - t0)
    return times[1:]


def _p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]


def main(argv: list[str]) -> int:
    repeats = int(argv[1]) if len(argv) > 1 else 50
    result = measure(repeats)
    for name, values in [*result.items(), ("write_seed", measure_write(repeats))]:
        print(
            f"{name:12s} n={len(values)} median={statistics.median(values) * 1e3:.3f}ms "
            f"p95={_p95(values) * 1e3:.3f}ms min={min(values) * 1e3:.3f}ms "
            f"max={max(values) * 1e3:.3f}ms"
        )
    ratio = statistics.median(result["ours"]) / statistics.median(result["genisoimage"])
    print(f"seed: ratio={ratio:.3f} (agent/baseline)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
