"""Metrics: libvirt stats → samples (recorded output, test:///default), samples → text, and the
endpoint of a running agent scraped over HTTP (libvirt test driver).

The real guest's counters moving are in test_metrics_guest.py.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import libvirt
import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent.metrics.http import MetricsServer, parse_head
from agent.metrics.scrape import Scraper
from agent.metrics.vms import vm_text
from agent.streams.client import StreamDenied, open_stream
from drivers.base import DiskSample, NicSample, Unavailable, VmSample
from drivers.libvirt.stats import collect, samples_from_stats
from tests.agent_harness import instance_event, running_agent, vm_instance

# One record of `virsh domstats` / getAllDomainStats(STATS_GROUPS) for a running test guest on
# qemu:///system (libvirt 9.0, QEMU 7.2, TCG), with a data disk added and an offline vCPU 1.
RECORDED_UUID = "3622f8fb-98d1-4ed7-9f38-ca56a563ad19"
RECORDED = {
    "state.state": 1, "state.reason": 1, "cpu.time": 357943000, "cpu.user": 135579000, "cpu.system": 222363000,
    "cpu.cache.monitor.count": 0, "cpu.haltpoll.success.time": 0, "cpu.haltpoll.fail.time": 0,
    "balloon.current": 131072, "balloon.maximum": 262144, "balloon.last-update": 0, "balloon.rss": 63556,
    "vcpu.current": 2, "vcpu.maximum": 3, "vcpu.0.state": 1, "vcpu.0.time": 60000000, "vcpu.0.wait": 0,
    "vcpu.0.delay": 634635747, "vcpu.2.state": 1, "vcpu.2.time": 1000000,
    "net.count": 1, "net.0.name": "vnet52", "net.0.rx.bytes": 90, "net.0.rx.pkts": 1, "net.0.rx.errs": 0,
    "net.0.rx.drop": 2, "net.0.tx.bytes": 342, "net.0.tx.pkts": 3, "net.0.tx.errs": 0, "net.0.tx.drop": 0,
    "block.count": 2,
    "block.0.name": "vda", "block.0.path": "/var/lib/herdsman/pool/x-data.qcow2", "block.0.backingIndex": 1,
    "block.0.rd.reqs": 12, "block.0.rd.bytes": 49152, "block.0.rd.times": 1, "block.0.wr.reqs": 3,
    "block.0.wr.bytes": 4096, "block.0.wr.times": 1, "block.0.fl.reqs": 0, "block.0.fl.times": 0,
    "block.1.name": "hdc", "block.1.path": "/var/lib/herdsman/seeds/x.iso", "block.1.rd.reqs": 0,
    "block.1.rd.bytes": 0, "block.1.wr.reqs": 0, "block.1.wr.bytes": 0, "block.1.capacity": 67584,
}


def parse(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Metric family name → (labels, value) of every sample, via prometheus_client's parser."""
    found: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found.setdefault(sample.name, []).append((sample.labels, sample.value))
    return found


def value(metrics: dict[str, list[tuple[dict[str, str], float]]], family: str, **labels: str) -> float:
    matches = [v for got, v in metrics.get(family, []) if all(got.get(k) == want for k, want in labels.items())]
    assert len(matches) == 1, (family, labels, metrics.get(family))
    return matches[0]


# -- libvirt stats → samples ---------------------------------------------------------------------
def test_recorded_stats_become_a_typed_sample() -> None:
    other = str(uuid.uuid4())
    [sample] = samples_from_stats([(RECORDED_UUID, RECORDED), (other, {"state.state": 1})], {RECORDED_UUID: "web-1"})
    assert sample.instance_uuid == RECORDED_UUID and sample.name == "web-1" and sample.state == "running"
    assert sample.cpu_seconds == pytest.approx(0.357943)
    assert sample.vcpus == 2
    assert sample.vcpu_seconds == (pytest.approx(0.06),)  # vCPU 1 is offline: the list stops there
    assert (sample.memory_bytes, sample.memory_max_bytes, sample.memory_rss_bytes) == (128 << 20, 256 << 20,
                                                                                       63556 << 10)
    assert sample.disks == (DiskSample("vda", 49152, 4096, 12, 3), DiskSample("hdc", 0, 0, 0, 0))
    assert sample.nics == (NicSample("vnet52", 90, 342, 1, 3, 0, 0, 2, 0),)


def test_a_stopped_vm_has_a_state_and_nothing_else() -> None:
    [sample] = samples_from_stats([(RECORDED_UUID, {"state.state": 5, "state.reason": 1})], {RECORDED_UUID: None})
    assert sample == VmSample(RECORDED_UUID, "stopped")


def test_collect_on_the_test_driver_reports_managed_domains_only() -> None:
    conn = libvirt.open("test:///default")
    try:
        dom = conn.lookupByName("test")
        assert collect(conn, {}) == []
        [sample] = collect(conn, {dom.UUIDString(): "test"})
        assert (sample.instance_uuid, sample.state, sample.name) == (dom.UUIDString(), "running", "test")
    finally:
        conn.close()


# -- samples → text ------------------------------------------------------------------------------
def test_text_is_valid_exposition_with_every_family() -> None:
    [sample] = samples_from_stats([(RECORDED_UUID, RECORDED)], {RECORDED_UUID: 'say "hi"\\\nbye'})
    stopped = VmSample(str(uuid.uuid4()), "stopped", name="idle")
    metrics = parse(vm_text([sample, stopped], {RECORDED_UUID: "healthy"}))
    u = RECORDED_UUID
    assert value(metrics, "herdsman_vm_info", uuid=u) == 1
    assert [labels["name"] for labels, _ in metrics["herdsman_vm_info"]] == ['say "hi"\\\nbye', "idle"]
    assert value(metrics, "herdsman_vm_state", uuid=u, state="running") == 1
    assert sum(v for labels, v in metrics["herdsman_vm_state"] if labels["uuid"] == u) == 1
    assert value(metrics, "herdsman_vm_state", uuid=stopped.instance_uuid, state="stopped") == 1
    assert metrics["herdsman_vm_health"] == [({"uuid": u, "health": "healthy"}, 1)]
    assert value(metrics, "herdsman_vm_cpu_seconds_total", uuid=u) == pytest.approx(0.357943)
    assert value(metrics, "herdsman_vm_vcpu_seconds_total", uuid=u, vcpu="0") == pytest.approx(0.06)
    assert value(metrics, "herdsman_vm_memory_bytes", uuid=u) == 128 << 20
    assert value(metrics, "herdsman_vm_memory_rss_bytes", uuid=u) == 63556 << 10
    assert value(metrics, "herdsman_vm_disk_read_bytes_total", uuid=u, disk="vda") == 49152
    assert value(metrics, "herdsman_vm_disk_writes_total", uuid=u, disk="vda") == 3
    assert value(metrics, "herdsman_vm_network_transmit_bytes_total", uuid=u, interface="vnet52") == 342
    assert value(metrics, "herdsman_vm_network_receive_drops_total", uuid=u, interface="vnet52") == 2
    # the stopped VM has only info and state series
    assert {name for name, samples in metrics.items() for labels, _ in samples
            if labels.get("uuid") == stopped.instance_uuid} == {"herdsman_vm_info", "herdsman_vm_state"}


def test_no_vms_no_vm_families() -> None:
    assert vm_text([]) == ""


# -- the endpoint --------------------------------------------------------------------------------
async def scrape(port: int, request: bytes = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n") -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    data = await reader.read()
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body


def test_request_heads() -> None:
    assert parse_head(b"GET /metrics?x=1 HTTP/1.1\r\nHost: a\r\n\r\n") == ("GET", "/metrics")
    assert parse_head(b"\x16\x03\x01 binary junk\r\n\r\n") is None
    assert parse_head(b"GET /metrics SPDY/3\r\n\r\n") is None


async def test_agent_serves_vm_and_agent_metrics(tmp_path: Path) -> None:
    async with running_agent(tmp_path, metrics_listen="127.0.0.1:0", stream_listen="127.0.0.1:0") as (ctl, agent):
        assert agent.metrics is not None
        web, db = vm_instance("web"), vm_instance("db")
        for inst in (web, db):
            assert (await instance_event(ctl, "activate", inst)).get("transitioning") is None
        await instance_event(ctl, "deactivate", db, process={"timeout": 0})
        bad = vm_instance("bad", vcpu=0)
        assert (await instance_event(ctl, "activate", bad))["transitioning"] == "error"
        with pytest.raises(StreamDenied):
            async with open_stream(f"ws://127.0.0.1:{agent.streams.port}/v1/logs/", "forged"):
                pass

        status, headers, body = await scrape(agent.metrics.port)
        assert status == 200 and headers["content-type"].startswith("text/plain; version=0.0.4")
        metrics = parse(body.decode())
        assert value(metrics, "herdsman_vm_state", uuid=web["uuid"], state="running") == 1
        assert value(metrics, "herdsman_vm_state", uuid=db["uuid"], state="stopped") == 1
        assert value(metrics, "herdsman_vm_info", uuid=db["uuid"], name="db") == 1
        assert value(metrics, "herdsman_event_duration_seconds_count", event="compute.instance.activate",
                     outcome="ok") == 2
        assert value(metrics, "herdsman_event_duration_seconds_count", event="compute.instance.activate",
                     outcome="error") == 1
        assert value(metrics, "herdsman_event_duration_seconds_count", event="compute.instance.deactivate",
                     outcome="ok") == 1
        assert value(metrics, "herdsman_controller_connected") == 1
        assert value(metrics, "herdsman_controller_subscriptions_total") == 1
        assert value(metrics, "herdsman_libvirt_up") == 1
        assert value(metrics, "herdsman_stream_refused_total", status="401") == 1
        assert value(metrics, "herdsman_stream_connections_total", kind="logs") == 0
        assert value(metrics, "process_resident_memory_bytes") > 0

        # a stream opened shows as open, then as closed
        log = tmp_path / "log" / "console" / f"{web['uuid']}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_bytes(b"hello\r\n")
        reply = await instance_event(ctl, "logs", web, process={"lines": 1, "follow": True})
        grant = reply["data"]["instanceHostMap"]
        async with open_stream(grant["url"], grant["token"]) as ws:
            assert await ws.recv() == "00 hello"
            metrics = parse((await scrape(agent.metrics.port))[2].decode())
            assert value(metrics, "herdsman_stream_connections_open", kind="logs") == 1
        for _ in range(50):
            metrics = parse((await scrape(agent.metrics.port))[2].decode())
            if value(metrics, "herdsman_stream_connections_open", kind="logs") == 0:
                break
            await asyncio.sleep(0.05)
        assert value(metrics, "herdsman_stream_connections_open", kind="logs") == 0
        assert value(metrics, "herdsman_stream_connections_total", kind="logs") == 1

        # the controller goes away: connected drops to 0, and the reconnect is counted
        await ctl.kill_connections()
        for _ in range(100):
            metrics = parse((await scrape(agent.metrics.port))[2].decode())
            if value(metrics, "herdsman_controller_subscriptions_total") == 2:
                break
            await asyncio.sleep(0.1)
        assert value(metrics, "herdsman_controller_subscriptions_total") == 2
        assert value(metrics, "herdsman_controller_connection_attempts_total") >= 2

        # only GET/HEAD on /metrics and /
        assert (await scrape(agent.metrics.port, b"GET /nope HTTP/1.1\r\n\r\n"))[0] == 404
        status, headers, _ = await scrape(agent.metrics.port, b"POST /metrics HTTP/1.1\r\n\r\n")
        assert status == 405 and headers["allow"] == "GET, HEAD"
        status, headers, body = await scrape(agent.metrics.port, b"HEAD /metrics HTTP/1.1\r\n\r\n")
        assert status == 200 and body == b"" and int(headers["content-length"]) > 0
        assert (await scrape(agent.metrics.port, b"junk\r\n\r\n"))[0] == 400
        for inst in (web, db):
            await instance_event(ctl, "purge", inst)


async def test_without_libvirt_the_agent_metrics_are_still_served() -> None:
    async def gone() -> list[VmSample]:
        raise Unavailable("libvirt at qemu:///system is unavailable: end of file (daemon gone)")

    server = MetricsServer("127.0.0.1:0", Scraper(gone).scrape)
    await server.start()
    try:
        status, _, body = await scrape(server.port)
    finally:
        await server.close()
    metrics = parse(body.decode())
    assert status == 200
    assert value(metrics, "herdsman_libvirt_up") == 0
    assert "herdsman_vm_info" not in metrics and "herdsman_agent_info" in metrics


async def test_a_failing_scrape_is_a_500_and_the_server_goes_on() -> None:
    calls = 0

    async def flaky() -> tuple[bytes, str]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("bug")
        return b"ok 1\n", "text/plain"

    server = MetricsServer("127.0.0.1:0", flaky)
    await server.start()
    try:
        assert (await scrape(server.port))[0] == 500
        assert (await scrape(server.port))[2] == b"ok 1\n"
        # a client that sends half a head and goes away leaves nothing behind
        _, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"GET /met")
        writer.close()
        assert (await scrape(server.port))[0] == 200
    finally:
        await server.close()


def test_listen_setting_is_validated() -> None:
    from agent.config import AgentConfig

    assert AgentConfig().metrics_listen is None
    assert AgentConfig(metrics_listen="127.0.0.1:9346").metrics_listen == "127.0.0.1:9346"
    with pytest.raises(ValueError, match="HOST:PORT"):
        AgentConfig(metrics_listen="9346x")
