"""Every golden domain is accepted by a real libvirtd (VIR_DOMAIN_DEFINE_VALIDATE) and reads back.

Needs root and qemu:///system (see scripts/libvirt-up); session-mode goldens are defined on
qemu:///session. Each domain is only defined, never started, and undefined again; a leftover
with the same uuid (from an interrupted run) is removed first.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import libvirt
import pytest

from drivers.libvirt.domxml.metadata import NAMESPACE, parse_metadata
from drivers.libvirt.domxml.writer import display_text
from tests.xmlcheck import golden_cases

pytestmark = pytest.mark.libvirtd

CASES = {case.name: case for case in golden_cases()}


def _open(uri: str) -> libvirt.virConnect:
    if os.geteuid() != 0:
        pytest.skip(f"{uri}: these tests define domains on the system libvirtd and need root")
    try:
        return libvirt.open(uri)
    except libvirt.libvirtError as exc:
        pytest.skip(f"{uri} is unreachable ({exc}); start it with scripts/libvirt-up")


@pytest.fixture(scope="module")
def system() -> Iterator[libvirt.virConnect]:
    conn = _open("qemu:///system")
    yield conn
    conn.close()


@pytest.fixture(scope="module")
def session() -> Iterator[libvirt.virConnect]:
    conn = _open("qemu:///session")
    yield conn
    conn.close()


def _remove_leftover(conn: libvirt.virConnect, uuid: str) -> None:
    for lookup in (conn.lookupByUUIDString, conn.lookupByName):
        try:
            dom = lookup(uuid)
        except libvirt.libvirtError:
            continue
        if dom.isActive():
            dom.destroy()
        dom.undefine()


@pytest.mark.parametrize("name", sorted(CASES))
def test_define_golden(name: str, request: pytest.FixtureRequest) -> None:
    case = CASES[name]
    conn = request.getfixturevalue("session" if case.session else "system")
    uuid = case.spec.instance_uuid
    _remove_leftover(conn, uuid)
    dom = conn.defineXMLFlags(case.render(), libvirt.VIR_DOMAIN_DEFINE_VALIDATE)
    try:
        assert (dom.UUIDString(), dom.name()) == (uuid, uuid)
        from_desc = parse_metadata(dom.XMLDesc(0))
        from_api = parse_metadata(dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, NAMESPACE, 0))
        for meta in (from_desc, from_api):
            assert meta.instance_uuid == uuid
            assert meta.labels == case.spec.labels
            assert meta.spec_hash == case.spec.spec_hash()
        assert from_api == from_desc
        if case.spec.name:
            assert dom.metadata(libvirt.VIR_DOMAIN_METADATA_TITLE, None, 0) == display_text(case.spec.name)
    finally:
        dom.undefine()
    with pytest.raises(libvirt.libvirtError):
        conn.lookupByUUIDString(uuid)
