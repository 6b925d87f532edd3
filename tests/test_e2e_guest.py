"""End to end: a controller event boots the real test guest under libvirtd + qemu (TCG)."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import time
from pathlib import Path

import pytest

from tests.agent_harness import instance_event, ping, ping_instances, running_agent, vm_instance
from tests.libvirtd_fixtures import SYSTEM_URI, host_dirs, remove_pool, system_conn  # noqa: F401 (fixtures)

pytestmark = [pytest.mark.libvirtd, pytest.mark.guest, pytest.mark.timeout(900)]

USERDATA = """#!/bin/sh
if [ -f /mnt/root/hello ]; then echo "E2E-FOUND-$(cat /mnt/root/hello)"; else echo first > /mnt/root/hello; sync; fi
echo E2E-MARKER-7f3a
"""


def guest_manifest(folder: Path) -> str:
    try:
        from tests.guest.build import ensure_guest
    except ImportError:  # pragma: no cover - imported as a rootdir package under some runners
        from guest.build import ensure_guest  # type: ignore[no-redef]
    guest = ensure_guest()
    folder.mkdir(parents=True, exist_ok=True)
    manifest = folder / "image.json"
    manifest.write_text(json.dumps({"kernel": f"file://{guest.kernel}", "initrd": f"file://{guest.initrd}",
                                    "cmdline": guest.cmdline}))
    return f"kernel:file://{manifest}"


async def wait_for(path: Path, text: str, timeout: float, start: int = 0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            content = path.read_bytes()[start:].decode(errors="replace")
            if text in content:
                return content
        await asyncio.sleep(0.5)
    raise AssertionError(f"{text!r} not in {path} after {timeout}s:\n{path.read_text(errors='replace')[-3000:] if path.exists() else '(no log)'}")


async def test_guest_boots_runs_userdata_keeps_its_disk_and_purges_clean(tmp_path, system_conn, host_dirs):
    image = guest_manifest(Path(host_dirs["state_dir"]).parent / "images")
    state, logs = Path(host_dirs["state_dir"]), Path(host_dirs["log_dir"])
    async with running_agent(tmp_path, uri=SYSTEM_URI, **host_dirs) as (ctl, _):
        inst = vm_instance("e2e", memory_mb=160, imageUuid=image, userdata=USERDATA, hostname="e2e-guest",
                           dns=["192.168.122.1"], disks=[{"name": "state", "size": "64m"}, {"name": "data", "size": "16m"}])
        uuid = inst["uuid"]
        started = time.monotonic()
        reply = await instance_event(ctl, "activate", inst, timeout=300)
        assert reply.get("transitioning") is None, reply.get("transitioningMessage")
        log = logs / "console" / f"{uuid}.log"
        first = await wait_for(log, "HERDSMAN-GUEST: ready", 300)
        boot_seconds = time.monotonic() - started
        assert "HERDSMAN-GUEST: hostname e2e-guest" in first
        assert f"HERDSMAN-GUEST: instance-id {uuid}" in first
        assert "serial=state" in first and "serial=data" in first
        assert "E2E-MARKER-7f3a" in first and "E2E-FOUND" not in first
        print(f"activate → user-data marker: {boot_seconds:.1f} s")
        # the address the guest leased on the default network shows in the next pings
        address = None
        for _ in range(60):
            address = ping_instances(await ping(ctl))[uuid].get("primaryIpAddress")
            if address:
                break
            await asyncio.sleep(0.5)
        assert address and ipaddress.ip_address(address) in ipaddress.ip_network("192.168.122.0/24"), address

        # graceful stop (the guest's acpid powers it off), then start: the root disk kept its file
        reply = await instance_event(ctl, "deactivate", inst, process={"timeout": 60}, timeout=120)
        assert reply["data"]["instanceHostMap"]["instance"]["+data"]["+fields"]["herdsmanState"] == "stopped"
        offset = log.stat().st_size
        reply = await instance_event(ctl, "activate", inst, timeout=300)
        second = await wait_for(log, "HERDSMAN-GUEST: ready", 300, start=offset)
        assert "E2E-FOUND-first" in second
        assert "HERDSMAN-GUEST: rootdisk existing" in second
        assert f"HERDSMAN-GUEST: instance-id {uuid}" in second

        pool = system_conn.storagePoolLookupByName(host_dirs["storage_pool"])
        await instance_event(ctl, "purge", inst, timeout=120)
        assert not [v.name() for v in pool.listAllVolumes(0) if v.name().startswith(uuid)]
        assert not (state / "seeds" / f"{uuid}.iso").exists()
        assert not list((logs / "console").glob(f"{uuid}*"))
        assert uuid not in {d.UUIDString() for d in system_conn.listAllDomains(0)}


async def test_session_mode_forwards_ports_to_the_guest(tmp_path, host_dirs):
    """qemu:///session (the debug mode's default for a normal user): user-mode NIC, hostfwd ports."""
    import libvirt
    import socket

    try:
        libvirt.open("qemu:///session").close()
    except libvirt.libvirtError as exc:
        pytest.skip(f"qemu:///session unavailable: {exc}")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    image = guest_manifest(tmp_path / "images")
    userdata = "#!/bin/sh\nmkdir -p /www && echo PORT-FORWARD-OK > /www/index.html && busybox httpd -p 80 -h /www\necho HTTPD-STARTED\n"
    dirs = dict(host_dirs)
    async with running_agent(tmp_path, uri="qemu:///session", **dirs) as (ctl, _):
        inst = vm_instance("session", memory_mb=160, imageUuid=image, userdata=userdata, ports=[f"{port}:80"])
        reply = await instance_event(ctl, "activate", inst, timeout=300)
        assert reply.get("transitioning") is None, reply.get("transitioningMessage")
        try:
            await wait_for(Path(dirs["log_dir"]) / "console" / f"{inst['uuid']}.log", "HTTPD-STARTED", 300)
            body = b""
            for _ in range(40):
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
                        conn.sendall(b"GET / HTTP/1.0\r\n\r\n")
                        body = b"".join(iter(lambda: conn.recv(4096), b""))
                    if b"PORT-FORWARD-OK" in body:
                        break
                except OSError:
                    pass
                await asyncio.sleep(0.5)
            assert b"PORT-FORWARD-OK" in body, body
        finally:
            await instance_event(ctl, "purge", inst, timeout=120)
            session = libvirt.open("qemu:///session")
            try:
                remove_pool(session, dirs["storage_pool"])
            finally:
                session.close()
