"""libvirtd restarted while an activate is under way, on a host of its own (tests/hosts, host B):
the agent reconnects and adopts, the VM that was running keeps its qemu process, the activate
either completes or fails with a clear error and completes when the controller sends it again,
and nothing is left twice or half-made.

The activate is held in its image download (an HTTP server in the test trickles the initrd), so
the restart lands in the middle of it every time.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import libvirt
import pytest
from aiohttp import web

from tests.agent_harness import REPO, instance_event, ping, ping_instances, vm_instance
from tests.controller_double import ControllerDouble
from tests.guest.build import ensure_guest
from tests.hosts.env import HostsEnv
from tests.hosts.fixture import hosts_env  # noqa: F401 (fixture)

pytestmark = [pytest.mark.libvirtd, pytest.mark.guest, pytest.mark.timeout(600)]


class SlowImage:
    """The test guest as a kernel image over HTTP; the initrd trickles while `slow` is set."""

    def __init__(self, host: str) -> None:
        self.host = host
        self.guest = ensure_guest()
        self.slow = asyncio.Event()
        self.serving_initrd = asyncio.Event()
        self.runner: web.AppRunner | None = None
        self.port = 0

    async def start(self) -> str:
        app = web.Application()
        app.router.add_get("/image.json", self._manifest)
        app.router.add_get("/kernel", self._file(Path(self.guest.kernel)))
        app.router.add_get("/initrd", self._initrd)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, self.host, 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return f"kernel:http://{self.host}:{self.port}/image.json"

    async def _manifest(self, _: web.Request) -> web.Response:
        return web.json_response({"kernel": "kernel", "initrd": "initrd", "cmdline": self.guest.cmdline})

    @staticmethod
    def _file(path: Path):  # type: ignore[no-untyped-def]
        async def handler(_: web.Request) -> web.Response:
            return web.Response(body=path.read_bytes())
        return handler

    async def _initrd(self, request: web.Request) -> web.StreamResponse:
        data = Path(self.guest.initrd).read_bytes()
        response = web.StreamResponse(headers={"Content-Length": str(len(data))})
        await response.prepare(request)
        self.serving_initrd.set()
        step = 256 * 1024
        for i in range(0, len(data), step):
            await response.write(data[i:i + step])
            if self.slow.is_set():
                await asyncio.sleep(0.3)
        await response.write_eof()
        return response

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


@pytest.fixture
async def controller(hosts_env: HostsEnv) -> AsyncIterator[ControllerDouble]:  # noqa: F811
    ctl = ControllerDouble()
    await ctl.start(host=hosts_env.root_address)
    yield ctl
    await ctl.stop()


async def test_a_libvirtd_restart_during_an_activate(hosts_env: HostsEnv,  # noqa: F811
                                                      controller: ControllerDouble) -> None:
    b = hosts_env.b
    ctl = controller
    image = SlowImage(hosts_env.root_address)
    reference = await image.start()
    log = open(b.path("/var/log/herdsman") / "restart-test-agent.log", "wb")
    agent = b.popen([sys.executable, "-m", "agent", "run", "--url", ctl.url, "--access-key", "agent",
                     "--secret-key", "secret", "--domain-type", "qemu", "--log-format", "text"],
                    cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    conn = libvirt.open(b.libvirt_uri)
    running = vm_instance("before", memory_mb=128, networkMode="none", imageUuid=reference)
    starting = vm_instance("during", memory_mb=128, networkMode="none", imageUuid=reference,
                           disks=[{"name": "data", "size": "16m"}])
    try:
        await ctl.wait_subscribed(timeout=120)
        reply = await instance_event(ctl, "activate", running, timeout=300)
        assert reply.get("transitioning") != "error", reply.get("transitioningMessage")
        qemu_id = conn.lookupByUUIDString(running["uuid"]).ID()
        conn.close()

        # a VM whose image is new to the host: its activate waits in the download...
        image.slow.set()
        image.serving_initrd.clear()
        for entry in b.path("/var/lib/herdsman/kernels").iterdir():  # the next VM downloads it again
            subprocess.run(["rm", "-rf", str(entry)], check=True)
        pending = asyncio.ensure_future(instance_event(ctl, "activate", starting, timeout=300))
        await asyncio.wait_for(image.serving_initrd.wait(), 60)
        # ...when libvirtd restarts
        b.restart_libvirtd()
        image.slow.clear()
        reply = await pending
        deadline = time.monotonic() + 120
        while reply.get("transitioning") == "error":  # Cattle sends it again after an error
            assert "libvirt" in reply["transitioningMessage"], reply["transitioningMessage"]
            assert time.monotonic() < deadline, reply["transitioningMessage"]
            await asyncio.sleep(2)
            reply = await instance_event(ctl, "activate", starting, timeout=300)
        assert reply.get("transitioning") != "error", reply.get("transitioningMessage")

        deadline = time.monotonic() + 60
        while True:
            listed = ping_instances(await ping(ctl))
            if {running["uuid"], starting["uuid"]} <= set(listed):
                break
            assert time.monotonic() < deadline, listed
            await asyncio.sleep(0.5)
        assert listed[running["uuid"]]["state"] == "running" and listed[starting["uuid"]]["state"] == "running"
        conn = libvirt.open(b.libvirt_uri)
        assert conn.lookupByUUIDString(running["uuid"]).ID() == qemu_id  # the same qemu: untouched
        names = [d.UUIDString() for d in conn.listAllDomains(0)]
        assert sorted(names) == sorted([running["uuid"], starting["uuid"]])  # nothing twice
        pool = conn.storagePoolLookupByName("herdsman")
        pool.refresh(0)
        volumes = [v.name() for v in pool.listAllVolumes(0) if v.name().startswith(starting["uuid"])]
        assert volumes == [f"{starting['uuid']}-data.qcow2"]  # one disk, made once
        conn.close()
    finally:
        for inst in (running, starting):
            await instance_event(ctl, "purge", inst, timeout=120)
        agent.kill()
        agent.wait(timeout=30)
        log.close()
        await image.stop()
