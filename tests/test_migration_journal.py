"""The outgoing-migration journal (what a restarted agent needs to finish a migration) and the
destination link that outlives a broken connection."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import libvirt
import psutil
import pytest

from drivers.libvirt.migration.destination import Created, Prepared
from drivers.libvirt.migration.journal import Entry, Journal, Owner
from drivers.libvirt.migration.link import DestinationLink
from drivers.libvirt.migration.options import Destination, MigrationOptions

UUID = "6f1c2d3e-4b5a-4c7d-8e9f-0a1b2c3d4e5f"


def entry(uuid: str = UUID) -> Entry:
    prepared = Prepared(created=[Created("folder", folder="/var/lib/herdsman/seeds"),
                                 Created("file", name="seed.iso", folder="/var/lib/herdsman/seeds"),
                                 Created("volume", name=f"{uuid}-root.qcow2", pool="herdsman")],
                        copied_bytes=123 << 20)
    return Entry(uuid, Destination(libvirt_uri="qemu+tcp://10.0.0.2/system", migration_address="10.0.0.2"),
                 "0b0e7e3a-94a4-4d36-9f4c-3a4f7b7a1c11", MigrationOptions(bandwidth=3, auto_converge=False), prepared,
                 Owner(4242, 1796291021.5))


def test_an_entry_comes_back_as_written_private_to_the_agent(tmp_path) -> None:
    os.umask(0o022)
    journal = Journal(tmp_path)
    journal.write(entry())
    assert journal.entries() == [entry()]
    assert stat.S_IMODE(journal.folder.stat().st_mode) == 0o700
    assert stat.S_IMODE(journal.path(UUID).stat().st_mode) == 0o600
    assert [p.name for p in journal.folder.iterdir()] == [f"{UUID}.json"]  # no temporary file left
    journal.remove(UUID)
    journal.remove(UUID)  # twice: nothing to do
    assert journal.entries() == []


def test_no_folder_means_nothing_unfinished(tmp_path) -> None:
    assert Journal(tmp_path / "missing").entries() == []


@pytest.mark.parametrize("text", ["{", '{"uuid": "x"}', "[]", '{"uuid": "%s", "destination": {"libvirtUri": "x"}}' % UUID])
def test_an_unreadable_entry_is_left_for_an_operator_and_the_others_still_count(tmp_path, text, caplog) -> None:
    journal = Journal(tmp_path)
    journal.write(entry())
    bad = journal.folder / "0a0a0a0a-0000-4000-8000-000000000000.json"
    bad.write_text(text)
    assert journal.entries() == [entry()]
    assert bad.exists() and "unreadable migration journal entry" in caplog.text


def test_an_entry_under_another_vms_name_is_not_acted_on(tmp_path, caplog) -> None:
    journal = Journal(tmp_path)
    journal.write(entry())
    journal.path(UUID).rename(journal.folder / "0a0a0a0a-0000-4000-8000-000000000000.json")
    assert journal.entries() == []
    assert "names another VM" in caplog.text


def test_an_entry_is_left_to_its_owner_while_that_process_runs() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        owner = Owner(child.pid, psutil.Process(child.pid).create_time())
        assert owner.alive_elsewhere()  # `herdsman migrate` beside the agent: it finishes its own
        assert not Owner(child.pid, owner.started - 100).alive_elsewhere()  # the pid was reused
        assert not Owner.current().alive_elsewhere()  # this process: ours to finish
    finally:
        child.kill()
        child.wait()
    assert not owner.alive_elsewhere()  # it died: the agent finishes it


def test_the_link_opens_a_dead_connection_again_and_retries_once() -> None:
    dead = libvirt.open("test:///default")
    dead.close()  # a connection libvirtd dropped (keepalive timeout) behaves the same: calls fail, not alive
    opened: list[libvirt.virConnect] = []

    def reopen() -> libvirt.virConnect:
        opened.append(libvirt.open("test:///default"))
        return opened[-1]

    link = DestinationLink(dead, reopen)
    assert link.call(lambda c: c.getHostname()) == opened[0].getHostname()
    assert link.reopened and link.conn is opened[0]
    opened[0].close()


def test_the_link_raises_what_a_live_connection_answers() -> None:
    conn = libvirt.open("test:///default")
    link = DestinationLink(conn, lambda: pytest.fail("a live connection is never replaced"))
    with pytest.raises(libvirt.libvirtError):
        link.call(lambda c: c.lookupByName("no-such-domain"))
    assert not link.reopened
    conn.close()
