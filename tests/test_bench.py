"""The benchmark suite's plumbing works (never its figures: performance is not asserted)."""

from __future__ import annotations

import datetime
import subprocess
import sys

import libvirt
import pytest

from bench import activate, fixtures, metrics, procwatch
from bench.common import REPO, Result, Summary, Target, append_result, percentile
from drivers.libvirt.domxml import metadata

pytestmark = pytest.mark.timeout(120)


def test_percentile_is_a_measured_value_by_nearest_rank():
    values = [5.0, 1.0, 4.0, 2.0, 3.0]
    assert percentile(values, 50) == 3.0
    assert percentile(values, 95) == 5.0
    assert percentile(values, 1) == 1.0
    s = Summary.of(values)
    assert (s.n, s.median, s.min, s.max) == (5, 3.0, 1.0, 5.0)


def test_target_direction():
    assert Target("rate", 310, 300, "/s", at_least=True).ok
    assert not Target("rate", 290, 300, "/s", at_least=True).ok
    assert Target("p99", 49, 50, " ms").ok
    assert "MISSED" in Target("p99", 51, 50, " ms").describe()


def test_results_file_gets_a_header_once_and_one_row_per_result(tmp_path):
    path = tmp_path / "RESULTS.md"
    started = datetime.datetime(2026, 1, 2, 3, 4, tzinfo=datetime.UTC)
    for name in ("a", "b"):
        append_result(Result(name, 1.5, {"x|y": "1"}, [Target("t", 1, 2, " s")]), started=started,
                      commit="abc1234", host="2 cores", command="python -m bench", path=path)
    text = path.read_text()
    assert text.count("# Benchmark results") == 1
    rows = [line for line in text.splitlines() if line.startswith("| 2026-01-02 03:04 ")]
    assert len(rows) == 2
    assert "x\\|y=1" in rows[0], "a pipe in a figure must not split the table cell"
    assert "| a | 1.50 |" in rows[0] and "t 1.00 s (≤ 2.00 s: ok)" in rows[0]


async def test_activate_through_the_controller_process_runs_every_vm():
    runs = await activate.measure(4, (1, 3))
    for run in runs:
        assert run["errors"] == []
        assert run["running"] == 4
        assert len(run["latencies"]) == 4
    conn = libvirt.open(fixtures.TEST_URI)
    try:
        left = [d.name() for d in conn.listAllDomains(0) if "io.herdsman.bench" in d.XMLDesc(0)]
        volumes = [v.name() for p in conn.listAllStoragePools(0) for v in p.listAllVolumes(0)]
    finally:
        conn.close()
    assert left == [], "the benchmark undefines every domain it made"
    assert not [v for v in volumes if v.endswith(("-data.qcow2", "-logs.qcow2"))], volumes


def test_node_file_holds_running_agent_domains(tmp_path):
    conn = libvirt.open(fixtures.TEST_URI)
    try:
        profile = fixtures.profile_of(conn)
    finally:
        conn.close()
    policy = fixtures.policy_of(fixtures.agent_config("http://127.0.0.1:9/v1", tmp_path))
    insts = fixtures.instances(3, "node")
    uri = procwatch.write_node_file(tmp_path / "node file.xml", [fixtures.render(i, profile, policy) for i in insts])
    other = libvirt.open(uri)
    try:
        doms = other.listAllDomains(0)
        assert {d.UUIDString() for d in doms} == {i["uuid"] for i in insts}
        assert all(d.isActive() for d in doms)
        assert all(d.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, metadata.NAMESPACE, 0) for d in doms)
    finally:
        other.close()


def test_command_line_rejects_unknown_benchmarks():
    done = subprocess.run([sys.executable, "-m", "bench", "--no-record", "nope"], cwd=REPO,
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2
    assert "unknown benchmark" in done.stderr and "activate" in done.stderr


async def test_metrics_full_stats_scrapes_serve_every_vm():
    found = await metrics.full_scrapes(3, 2)
    assert len(found["scrape"]) == 2 and len(found["parse"]) == 5
    assert min(found["bytes"]) > 3 * 34 * 40  # 34 series per VM, each line longer than 40 bytes


async def test_health_benchmark_probes_every_vm_and_reports_each_once() -> None:
    from bench import health

    m = await health.measure(50, 1.0)
    assert m["stats"]["transitions"] == {"initializing->healthy": 50}
    assert m["log_lines"] == 50 and m["reports"] == {"accepted": 50} and m["stats"]["unreported"] == 0
    assert m["stats"]["probes"] >= 50 and m["bare"]["failures"] == 0
    assert {"probing", "idle", "bare"} <= set(m["usage"])
