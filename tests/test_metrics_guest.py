"""Metrics of a real VM: the test guest on qemu:///system (TCG), scraped before and after it
receives traffic; its CPU time and NIC counters must move, its memory must be what it was given."""

from __future__ import annotations

import asyncio
import socket

import pytest

from tests.streams_vm import net_guest
from tests.test_metrics import parse, scrape, value

pytestmark = [pytest.mark.libvirtd, pytest.mark.guest, pytest.mark.timeout(900)]

DATAGRAMS = 100
PAYLOAD = 1000


async def send_udp(address: str, count: int) -> None:
    """Datagrams to the guest's discard port, paced so the TCG guest keeps up; the first one
    alone, so the host resolves the guest's MAC before the rest are queued."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.sendto(b"x" * PAYLOAD, (address, 9))
        await asyncio.sleep(0.5)
        for _ in range(count):
            sock.sendto(b"x" * PAYLOAD, (address, 9))
            await asyncio.sleep(0.005)


async def test_a_running_guest_counters_move() -> None:
    async with net_guest("metrics-guest", "#!/bin/sh\necho METRICS-READY\n", ready_marker="METRICS-READY",
                         metrics_listen="127.0.0.1:0") as guest:
        agent, u = guest.agent, guest.uuid
        assert agent.metrics is not None
        address = None
        for _ in range(120):
            address = (await agent.driver.guest_network(u)).primary
            if address:
                break
            await asyncio.sleep(0.5)
        assert address, "the guest got no address on the default network"

        status, _, body = await scrape(agent.metrics.port)
        assert status == 200
        before = parse(body.decode())
        [(nic_labels, rx_before)] = [(labels, v) for labels, v in before["herdsman_vm_network_receive_bytes_total"]
                                     if labels["uuid"] == u]
        assert nic_labels["interface"].startswith("vnet")
        cpu_before = value(before, "herdsman_vm_cpu_seconds_total", uuid=u)
        assert cpu_before > 0

        await send_udp(address, DATAGRAMS)
        await asyncio.sleep(1)
        after = parse((await scrape(agent.metrics.port))[2].decode())
        received = value(after, "herdsman_vm_network_receive_bytes_total", uuid=u, interface=nic_labels["interface"])
        assert received - rx_before >= DATAGRAMS * PAYLOAD, (rx_before, received)
        assert value(after, "herdsman_vm_network_receive_packets_total", uuid=u,
                     interface=nic_labels["interface"]) > DATAGRAMS
        assert value(after, "herdsman_vm_cpu_seconds_total", uuid=u) > cpu_before
        assert value(after, "herdsman_vm_vcpu_seconds_total", uuid=u, vcpu="0") > 0
        assert value(after, "herdsman_vm_vcpus", uuid=u) == 1
        assert value(after, "herdsman_vm_memory_bytes", uuid=u) == 160 << 20
        assert value(after, "herdsman_vm_memory_rss_bytes", uuid=u) > 16 << 20
        # the guest read its NoCloud seed from the cdrom
        assert max(v for labels, v in after["herdsman_vm_disk_read_bytes_total"] if labels["uuid"] == u) > 0
        assert value(after, "herdsman_vm_state", uuid=u, state="running") == 1
        assert value(after, "herdsman_vm_info", uuid=u, name="metrics-guest") == 1
        # the agent's own: the boot's activate, the kernel image fetched once into the cache
        assert value(after, "herdsman_event_duration_seconds_count", event="compute.instance.activate",
                     outcome="ok") == 1
        assert value(after, "herdsman_image_cache_requests_total", kind="kernel", result="miss") == 1
        assert value(after, "herdsman_image_cache_bytes") > 1 << 20  # kernel + initrd
        assert value(after, "herdsman_libvirt_up") == 1
