"""The libvirt connection: events on the asyncio loop, loss and reconnect, lifecycle mapping.

Everything runs against real libvirt: the in-process ``test:///default`` driver, and the real
libvirtd reached through a private unix-socket proxy that the tests can cut or stall, which
looks to the client exactly like a daemon that died or hung, without disturbing anyone else
using libvirtd. A real libvirtd restart happens on a namespaced test host of its own
(tests/hosts, host B), so the machine's libvirtd and the tests using it are never disturbed.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import libvirt
import pytest

from drivers.libvirt.connection import (
    LibvirtConnection,
    LibvirtUnavailable,
    backoff_delay,
)
from drivers.libvirt.events import LifecycleEvent, event_names, to_lifecycle_event
from tests.hosts.env import HostsEnv
from tests.hosts.fixture import hosts_env  # noqa: F401 (fixture)
from tests.hosts.host import Host
from tests.libvirtd_fixtures import needs_libvirtd
from tests.unix_proxy import UnixProxy

REPO = Path(__file__).resolve().parent.parent




# -- the lifecycle table -----------------------------------------------------------------

V = libvirt
TABLE = [
    (V.VIR_DOMAIN_EVENT_DEFINED, V.VIR_DOMAIN_EVENT_DEFINED_ADDED, "defined", "added", None),
    (V.VIR_DOMAIN_EVENT_DEFINED, V.VIR_DOMAIN_EVENT_DEFINED_UPDATED, "defined", "updated", None),
    (V.VIR_DOMAIN_EVENT_UNDEFINED, V.VIR_DOMAIN_EVENT_UNDEFINED_REMOVED, "undefined", "removed",
     "destroy"),
    (V.VIR_DOMAIN_EVENT_UNDEFINED, V.VIR_DOMAIN_EVENT_UNDEFINED_RENAMED, "undefined", "renamed",
     None),
    (V.VIR_DOMAIN_EVENT_STARTED, V.VIR_DOMAIN_EVENT_STARTED_BOOTED, "started", "booted", "start"),
    (V.VIR_DOMAIN_EVENT_STARTED, V.VIR_DOMAIN_EVENT_STARTED_MIGRATED, "started", "migrated",
     "start"),
    (V.VIR_DOMAIN_EVENT_STARTED, V.VIR_DOMAIN_EVENT_STARTED_RESTORED, "started", "restored",
     "start"),
    (V.VIR_DOMAIN_EVENT_STARTED, V.VIR_DOMAIN_EVENT_STARTED_WAKEUP, "started", "wakeup", "start"),
    (V.VIR_DOMAIN_EVENT_SUSPENDED, V.VIR_DOMAIN_EVENT_SUSPENDED_PAUSED, "suspended", "paused",
     None),
    (V.VIR_DOMAIN_EVENT_SUSPENDED, V.VIR_DOMAIN_EVENT_SUSPENDED_IOERROR, "suspended", "ioerror",
     None),
    (V.VIR_DOMAIN_EVENT_RESUMED, V.VIR_DOMAIN_EVENT_RESUMED_UNPAUSED, "resumed", "unpaused", None),
    (V.VIR_DOMAIN_EVENT_STOPPED, V.VIR_DOMAIN_EVENT_STOPPED_SHUTDOWN, "stopped", "shutdown",
     "stop"),
    (V.VIR_DOMAIN_EVENT_STOPPED, V.VIR_DOMAIN_EVENT_STOPPED_DESTROYED, "stopped", "destroyed",
     "die"),
    (V.VIR_DOMAIN_EVENT_STOPPED, V.VIR_DOMAIN_EVENT_STOPPED_CRASHED, "stopped", "crashed", "die"),
    (V.VIR_DOMAIN_EVENT_STOPPED, V.VIR_DOMAIN_EVENT_STOPPED_FAILED, "stopped", "failed", "die"),
    (V.VIR_DOMAIN_EVENT_STOPPED, V.VIR_DOMAIN_EVENT_STOPPED_SAVED, "stopped", "saved", "stop"),
    (V.VIR_DOMAIN_EVENT_STOPPED, V.VIR_DOMAIN_EVENT_STOPPED_MIGRATED, "stopped", "migrated", None),
    (V.VIR_DOMAIN_EVENT_STOPPED, V.VIR_DOMAIN_EVENT_STOPPED_FROM_SNAPSHOT, "stopped",
     "from_snapshot", "stop"),
    (V.VIR_DOMAIN_EVENT_SHUTDOWN, V.VIR_DOMAIN_EVENT_SHUTDOWN_FINISHED, "shutdown", "finished",
     "stop"),
    (V.VIR_DOMAIN_EVENT_SHUTDOWN, V.VIR_DOMAIN_EVENT_SHUTDOWN_GUEST, "shutdown", "guest", "stop"),
    (V.VIR_DOMAIN_EVENT_SHUTDOWN, V.VIR_DOMAIN_EVENT_SHUTDOWN_HOST, "shutdown", "host", None),
    (V.VIR_DOMAIN_EVENT_PMSUSPENDED, V.VIR_DOMAIN_EVENT_PMSUSPENDED_MEMORY, "pmsuspended",
     "memory", None),
    (V.VIR_DOMAIN_EVENT_CRASHED, V.VIR_DOMAIN_EVENT_CRASHED_PANICKED, "crashed", "panicked", "die"),
    (V.VIR_DOMAIN_EVENT_CRASHED, V.VIR_DOMAIN_EVENT_CRASHED_CRASHLOADED, "crashed", "crashloaded",
     "die"),
]


@pytest.mark.parametrize(("event", "detail", "name", "detail_name", "status"), TABLE)
def test_lifecycle_table(event: int, detail: int, name: str, detail_name: str,
                         status: str | None) -> None:
    ev = to_lifecycle_event("u-1", "vm-1", event, detail, 12.5)
    assert (ev.event, ev.detail, ev.status) == (name, detail_name, status)
    assert (ev.uuid, ev.name, ev.timestamp) == ("u-1", "vm-1", 12.5)


def test_resumed_after_crash_is_a_restart() -> None:
    """on_crash=restart: libvirt resets the guest and resumes it without a 'started' event."""
    resumed = (V.VIR_DOMAIN_EVENT_RESUMED, V.VIR_DOMAIN_EVENT_RESUMED_UNPAUSED)
    assert to_lifecycle_event("u", "n", *resumed, 0.0, after_crash=True).status == "start"
    assert to_lifecycle_event("u", "n", *resumed, 0.0).status is None


def test_every_event_and_detail_the_bindings_know_has_a_name() -> None:
    """Names come from our table; it must cover everything these libvirt bindings define."""
    for ev_name in ("DEFINED", "UNDEFINED", "STARTED", "SUSPENDED", "RESUMED", "STOPPED",
                    "SHUTDOWN", "PMSUSPENDED", "CRASHED"):
        event = getattr(libvirt, f"VIR_DOMAIN_EVENT_{ev_name}")
        prefix = f"VIR_DOMAIN_EVENT_{ev_name}_"
        for const in dir(libvirt):
            if const.startswith(prefix) and not const.endswith("_LAST"):
                names = event_names(event, getattr(libvirt, const))
                assert names == (ev_name.lower(), const[len(prefix):].lower())


def test_unknown_codes_from_a_newer_libvirt_are_named_not_fatal() -> None:
    ev = to_lifecycle_event("u", "n", 42, 7, 0.0)
    assert (ev.event, ev.detail, ev.status) == ("unknown-42", "unknown-7", None)
    ev = to_lifecycle_event("u", "n", V.VIR_DOMAIN_EVENT_STOPPED, 99, 0.0)
    assert (ev.event, ev.detail, ev.status) == ("stopped", "unknown-99", None)


def test_backoff_doubles_with_jitter_and_stays_capped() -> None:
    rng = random.Random(7)
    delays = [backoff_delay(n, 0.5, 30.0, rng) for n in range(12)]
    for n, d in enumerate(delays):
        base = min(30.0, 0.5 * 2 ** n)
        assert base / 2 <= d <= base
    assert max(delays) <= 30.0
    assert len({round(backoff_delay(3, 0.5, 30.0, rng), 6) for _ in range(20)}) > 1


# -- helpers -----------------------------------------------------------------------------

async def wait_for(pred: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.02)


def test_domain_xml(name: str, domain_type: str) -> str:
    """A domain with no disks: under qemu it boots nothing but runs."""
    os_type = ("<type arch='x86_64' machine='pc'>hvm</type>" if domain_type == "qemu"
               else "<type>hvm</type>")
    return (f"<domain type='{domain_type}'><name>{name}</name><memory unit='MiB'>32</memory>"
            f"<os>{os_type}</os></domain>")


test_domain_xml.__test__ = False  # type: ignore[attr-defined]


@pytest.fixture
def domain_name() -> str:
    return f"herdsman-test-conn-{uuid.uuid4().hex[:8]}"


def cleanup_domain(uri: str, name: str) -> None:
    try:
        conn = libvirt.open(uri)
    except libvirt.libvirtError:
        return
    try:
        dom = conn.lookupByName(name)
        if dom.isActive():
            dom.destroy()
        if dom.isPersistent():
            dom.undefine()
    except libvirt.libvirtError:
        pass
    finally:
        conn.close()


# -- test:///default: events arrive on the loop ------------------------------------------

async def test_lifecycle_events_arrive_on_the_loop(domain_name: str) -> None:
    conn = LibvirtConnection("test:///default")
    events: list[LifecycleEvent] = []
    seen_on: set[tuple[int, asyncio.AbstractEventLoop]] = set()
    ups: list[bool] = []

    def on_event(ev: LifecycleEvent) -> None:
        seen_on.add((threading.get_ident(), asyncio.get_running_loop()))
        events.append(ev)

    conn.add_lifecycle_listener(on_event)
    conn.add_connection_listener(ups.append)
    await conn.start()
    try:
        await conn.wait_connected(2)
        assert conn.connected and ups == [True]
        virt = conn.get()
        dom = virt.defineXML(test_domain_xml(domain_name, "test"))
        dom.create()
        dom.destroy()
        dom.undefine()
        assert events == []  # nothing was delivered inline: only the loop dispatches events
        mine = lambda: [e for e in events if e.name == domain_name]
        await wait_for(lambda: len(mine()) >= 4, 5, "four lifecycle events")
        got = [(e.event, e.detail, e.status) for e in mine()]
        assert got == [("defined", "added", None), ("started", "booted", "start"),
                       ("stopped", "destroyed", "die"), ("undefined", "removed", "destroy")]
        assert {e.uuid for e in mine()} == {dom.UUIDString()}
        assert seen_on == {(threading.get_ident(), asyncio.get_running_loop())}
        assert all(abs(e.timestamp - time.time()) < 10 for e in mine())
    finally:
        await conn.close()
        cleanup_domain("test:///default", domain_name)
    assert not conn.connected


async def test_two_connections_and_a_second_start_share_one_event_loop(domain_name: str) -> None:
    a, b = LibvirtConnection("test:///default"), LibvirtConnection("test:///default")
    seen_a: list[str] = []
    seen_b: list[str] = []
    a.add_lifecycle_listener(lambda e: seen_a.append(e.name))
    b.add_lifecycle_listener(lambda e: seen_b.append(e.name))
    await a.start()
    await a.start()
    await b.start()
    try:
        dom = b.get().defineXML(test_domain_xml(domain_name, "test"))
        dom.undefine()
        await wait_for(lambda: seen_a.count(domain_name) == 2 and seen_b.count(domain_name) == 2,
                       5, "both connections to see define and undefine")
    finally:
        await a.close()
        await b.close()
        cleanup_domain("test:///default", domain_name)


def test_events_still_flow_when_the_process_moves_to_a_new_event_loop(domain_name: str) -> None:
    """libvirt takes one event implementation per process, for good; each asyncio.run here
    is a fresh loop (as each test is under pytest-asyncio) and must still get events."""

    async def one_round(n: int) -> list[str | None]:
        conn = LibvirtConnection("test:///default")
        got: list[str | None] = []
        conn.add_lifecycle_listener(lambda e: got.append(e.status)
                                    if e.name == f"{domain_name}-{n}" else None)
        await conn.start()
        try:
            dom = conn.get().defineXML(test_domain_xml(f"{domain_name}-{n}", "test"))
            dom.create()
            dom.destroy()
            dom.undefine()
            await wait_for(lambda: len(got) == 4, 5, "events on this loop")
        finally:
            await conn.close()
        return got

    for n in range(2):
        assert asyncio.run(one_round(n)) == [None, "start", "die", "destroy"]


async def test_a_listener_that_raises_does_not_stop_the_others(domain_name: str) -> None:
    conn = LibvirtConnection("test:///default")
    got: list[str] = []

    def broken(_: LifecycleEvent) -> None:
        raise ValueError("listener bug")

    conn.add_lifecycle_listener(broken)
    conn.add_lifecycle_listener(lambda e: got.append(e.event) if e.name == domain_name else None)
    await conn.start()
    try:
        conn.get().defineXML(test_domain_xml(domain_name, "test")).undefine()
        await wait_for(lambda: got == ["defined", "undefined"], 5, "events past a broken listener")
    finally:
        await conn.close()
        cleanup_domain("test:///default", domain_name)


# -- libvirt that is not there -----------------------------------------------------------

async def test_get_while_disconnected_names_the_uri_and_why(tmp_path: Path) -> None:
    uri = f"qemu+unix:///system?socket={tmp_path}/absent-sock"
    conn = LibvirtConnection(uri, backoff_initial=0.05, backoff_cap=0.2)
    started = time.monotonic()
    await conn.start()
    try:
        assert time.monotonic() - started < 2, "start() must not wait for libvirt"
        assert not conn.connected
        with pytest.raises(LibvirtUnavailable) as exc:
            conn.get()
        assert uri in str(exc.value)
        assert "absent-sock" in exc.value.reason  # libvirt's own words on why
        with pytest.raises(LibvirtUnavailable, match="waited 0.3 s"):
            await conn.wait_connected(0.3)
    finally:
        await conn.close()
    with pytest.raises(LibvirtUnavailable, match="connection closed"):
        conn.get()


# -- the real libvirtd, through a proxy the test controls --------------------------------

@pytest.fixture
def proxy(tmp_path: Path) -> Iterator[UnixProxy]:
    p = UnixProxy(tmp_path / "libvirt-sock")
    yield p
    p.stop()


class Recorder:
    """What a user of the connection sees: connection changes and the statuses of one VM."""

    def __init__(self, conn: LibvirtConnection, name: str) -> None:
        self.ups: list[bool] = []
        self.events: list[tuple[str, str]] = []
        self.statuses: list[str] = []
        conn.add_connection_listener(self.ups.append)
        conn.add_lifecycle_listener(self._on_event)
        self.name = name

    def _on_event(self, e: LifecycleEvent) -> None:
        if e.name == self.name:
            self.events.append((e.event, e.detail))
            if e.status is not None:
                self.statuses.append(e.status)


async def start_and_destroy(conn: LibvirtConnection, rec: Recorder, name: str) -> None:
    """A transient qemu domain: started, then destroyed; its events must reach us."""
    dom = conn.get().createXML(test_domain_xml(name, "qemu"))
    await wait_for(lambda: "start" in rec.statuses, 10, "the 'start' event")
    dom.destroy()
    await wait_for(lambda: "die" in rec.statuses, 10, "the 'die' event")
    # libvirt 9 / qemu 7.2: qemu starts paused, and destroy makes qemu report a host shutdown
    assert [e for e in rec.events if e[0] in ("started", "stopped")] == [
        ("started", "booted"), ("stopped", "destroyed")]


@needs_libvirtd
async def test_connects_once_libvirt_appears(proxy: UnixProxy) -> None:
    uri = f"qemu+unix:///system?socket={proxy.path}"
    conn = LibvirtConnection(uri, backoff_initial=0.1, backoff_cap=0.4)
    ups: list[bool] = []
    conn.add_connection_listener(ups.append)
    await conn.start()
    try:
        assert not conn.connected
        await asyncio.sleep(0.3)  # a few failed attempts in the background
        proxy.listen()
        started = time.monotonic()
        await conn.wait_connected(3)
        assert time.monotonic() - started < 1.0  # within one capped backoff step
        assert ups == [True]
        assert conn.get().getVersion() > 0
    finally:
        await conn.close()


@needs_libvirtd
async def test_reconnects_and_reregisters_events_after_the_daemon_drops(
        proxy: UnixProxy, domain_name: str) -> None:
    proxy.listen()
    uri = f"qemu+unix:///system?socket={proxy.path}"
    conn = LibvirtConnection(uri, backoff_initial=0.1, backoff_cap=0.4)
    rec = Recorder(conn, domain_name)
    await conn.start()
    try:
        await conn.wait_connected(5)
        proxy.cut()
        await wait_for(lambda: rec.ups == [True, False], 3, "the loss to be noticed")
        with pytest.raises(LibvirtUnavailable, match="end of file|I/O error") as exc:
            conn.get()
        assert uri in str(exc.value)
        proxy.listen()
        await wait_for(lambda: rec.ups == [True, False, True], 3, "the reconnect")
        await start_and_destroy(conn, rec, domain_name)  # events flow on the new connection
        assert rec.statuses == ["start", "die"]
    finally:
        await conn.close()
        cleanup_domain("qemu:///system", domain_name)


@needs_libvirtd
async def test_the_liveness_probe_notices_a_hung_daemon(proxy: UnixProxy, domain_name: str) -> None:
    proxy.listen()
    uri = f"qemu+unix:///system?socket={proxy.path}"
    conn = LibvirtConnection(uri, backoff_initial=0.1, backoff_cap=0.4,
                             probe_interval=1, probe_misses=1)
    rec = Recorder(conn, domain_name)
    await conn.start()
    try:
        await conn.wait_connected(5)
        proxy.freeze()
        frozen_at = time.monotonic()
        await wait_for(lambda: rec.ups == [True, False], 6, "the probe to give up")
        noticed_after = time.monotonic() - frozen_at
        assert noticed_after < 4, noticed_after
        with pytest.raises(LibvirtUnavailable, match="did not answer"):
            conn.get()
        proxy.restore()
        await wait_for(lambda: rec.ups == [True, False, True], 3, "the reconnect")
        dom = conn.get().defineXML(test_domain_xml(domain_name, "qemu"))
        dom.undefine()
        await wait_for(lambda: rec.statuses == ["destroy"], 5, "define/undefine events")
        assert rec.events == [("defined", "added"), ("undefined", "removed")]
    finally:
        await conn.close()
        cleanup_domain("qemu:///system", domain_name)


# -- restarting a real libvirtd (host B of tests/hosts: nobody else uses it) ---------------

def _restart_libvirtd(host: Host) -> float:
    """Stop the host's libvirtd and start it again; returns the outage in seconds."""
    t0 = time.monotonic()
    host.restart_libvirtd()
    return time.monotonic() - t0


@pytest.mark.libvirtd
async def test_survives_a_real_libvirtd_restart(hosts_env: HostsEnv, domain_name: str) -> None:  # noqa: F811
    host = hosts_env.b
    conn = LibvirtConnection(host.libvirt_uri, backoff_initial=0.2, backoff_cap=1.0)
    rec = Recorder(conn, domain_name)
    await conn.start()
    try:
        await conn.wait_connected(5)
        outage = await asyncio.to_thread(_restart_libvirtd, host)
        assert outage < 3, f"libvirtd was down {outage:.1f} s"
        await wait_for(lambda: rec.ups[:2] == [True, False], 5, "the loss to be noticed")
        await wait_for(lambda: rec.ups == [True, False, True], 10, "the reconnect")
        await start_and_destroy(conn, rec, domain_name)
        assert rec.statuses == ["start", "die"]
    finally:
        await conn.close()
        cleanup_domain(host.libvirt_uri, domain_name)
