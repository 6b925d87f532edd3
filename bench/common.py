"""Statistics, tables and the RESULTS.md log shared by every benchmark.

Figures are only comparable on the same machine at the same moment, so every benchmark
reports a ratio against a bare alternative measured in the same run, and every row written
to RESULTS.md says which machine, which commit and how loaded the machine was.
"""

from __future__ import annotations

import datetime
import math
import os
import statistics
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
RESULTS = BENCH_DIR / "RESULTS.md"

RESULTS_HEADER = """\
# Benchmark results

One row per benchmark per `python -m bench` run, appended by the run itself. Columns:

- **date**: when the run started (UTC).
- **commit**: `git rev-parse --short HEAD`, with `+dirty` when tracked files differed from it.
- **machine**: cores (`os.cpu_count()`), CPU model (`/proc/cpuinfo`), 1-minute load average
  when the run started (other people share these machines; a high load explains a slow row).
- **command**: what was run (`--quick` rows use smaller counts and are not comparable with full rows).
- **benchmark** and **ratio**: agent ÷ bare baseline measured in the same run (lower is better;
  what each ratio divides is in bench/README.md).
- **figures**: the measured values (ms are milliseconds, `/s` per second).
- **targets**: each target with `ok` or `MISSED`.

| date | commit | machine | command | benchmark | ratio | figures | targets |
|---|---|---|---|---|---|---|---|
"""


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100): a value that was actually measured."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


@dataclass(frozen=True)
class Summary:
    n: int
    median: float
    p95: float
    p99: float
    min: float
    max: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Summary:
        if not values:
            return cls(0, math.nan, math.nan, math.nan, math.nan, math.nan)
        return cls(len(values), statistics.median(values), percentile(values, 95), percentile(values, 99),
                   min(values), max(values))


@dataclass(frozen=True)
class Target:
    """A goal from the project's plan; benchmarks report it, tests never assert it."""

    what: str
    measured: float
    limit: float
    unit: str
    at_least: bool = False

    @property
    def ok(self) -> bool:
        return self.measured >= self.limit if self.at_least else self.measured <= self.limit

    def describe(self) -> str:
        sign = "≥" if self.at_least else "≤"
        return f"{self.what} {fmt(self.measured)}{self.unit} ({sign} {fmt(self.limit)}{self.unit}: {'ok' if self.ok else 'MISSED'})"


@dataclass
class Result:
    name: str
    ratio: float
    figures: dict[str, str] = field(default_factory=dict)
    targets: list[Target] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def fmt(value: float) -> str:
    if math.isnan(value):
        return "n/a"
    magnitude = abs(value)
    if magnitude >= 100:
        return f"{value:.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    if magnitude >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def ms(seconds: float) -> str:
    return fmt(seconds * 1000)


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    print(f"\n{title}")
    print("  " + "  ".join(str(h).rjust(w) if i else str(h).ljust(w) for i, (h, w) in enumerate(zip(header, widths))))
    for row in rows:
        print("  " + "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(row, widths))))


def summary_row(label: str, values_s: Sequence[float]) -> list[str]:
    """label, n, median, p95, p99, min, max — seconds shown as milliseconds."""
    s = Summary.of(values_s)
    return [label, str(s.n), ms(s.median), ms(s.p95), ms(s.p99), ms(s.min), ms(s.max)]


SUMMARY_HEADER = ("", "n", "median ms", "p95 ms", "p99 ms", "min ms", "max ms")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def machine() -> str:
    load = os.getloadavg()[0]
    return f"{os.cpu_count()} cores, {cpu_model()}, load {load:.2f}"


def git_commit() -> str:
    def git(*args: str) -> str:
        done = subprocess.run(["git", "--no-optional-locks", *args], cwd=REPO, capture_output=True, text=True, timeout=10, check=False)
        return done.stdout.strip() if done.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return f"{commit}+dirty" if dirty else commit


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def append_result(result: Result, *, started: datetime.datetime, commit: str, host: str, command: str,
                  path: Path = RESULTS) -> None:
    """One row for this result; the file and its header are created on first use."""
    if not path.exists():
        path.write_text(RESULTS_HEADER, encoding="utf-8")
    figures = "; ".join(f"{k}={v}" for k, v in result.figures.items())
    targets = "; ".join(t.describe() for t in result.targets) or "—"
    row = [started.strftime("%Y-%m-%d %H:%M"), commit, host, f"`{command}`", result.name,
           fmt(result.ratio), figures, targets]
    with path.open("a", encoding="utf-8") as out:
        out.write("| " + " | ".join(_cell(c) for c in row) + " |\n")
