"""Blocking steps on one libvirt domain, each run on a libvirt worker thread by the driver."""

from __future__ import annotations

from typing import Any

import libvirt

from drivers.base import DriverError, VmRecord
from drivers.libvirt.domxml import metadata
from drivers.libvirt.domxml.model import AgentMetadata

UNDEFINE_FLAGS = (
    libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
    | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
    | libvirt.VIR_DOMAIN_UNDEFINE_NVRAM
)


def libvirt_message(exc: libvirt.libvirtError) -> str:
    return f"libvirt: {exc.get_error_message() or exc}"


def live_and_config(dom: libvirt.virDomain) -> int:
    """Change the persistent definition, and the running domain when there is one."""
    return libvirt.VIR_DOMAIN_AFFECT_CONFIG | (libvirt.VIR_DOMAIN_AFFECT_LIVE if dom.isActive() else 0)


def start_if_stopped(dom: libvirt.virDomain) -> None:
    if not dom.isActive():
        dom.create()


def write_metadata(dom: libvirt.virDomain, meta: AgentMetadata, title: str | None,
                    description: str | None) -> None:
    flags = live_and_config(dom)
    dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, metadata.metadata_xml(meta), metadata.KEY,
                    metadata.NAMESPACE, flags)
    dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_TITLE, title or None, None, None, flags)
    dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_DESCRIPTION, description or None, None, None, flags)


def set_metadata_element(dom: libvirt.virDomain, meta: AgentMetadata) -> None:
    flags = live_and_config(dom)
    dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, metadata.metadata_xml(meta),
                    metadata.KEY, metadata.NAMESPACE, flags)


def destroy(dom: libvirt.virDomain) -> None:
    try:
        dom.destroy()
    except libvirt.libvirtError as exc:
        if dom.isActive():
            raise DriverError(libvirt_message(exc)) from None


def undefine(dom: libvirt.virDomain) -> None:
    try:
        dom.undefineFlags(UNDEFINE_FLAGS)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            return
        try:
            dom.undefine()  # drivers without NVRAM/snapshot support refuse the flags
        except libvirt.libvirtError:
            raise DriverError(libvirt_message(exc)) from None


def inspect(conn: libvirt.virConnect, dom: libvirt.virDomain, record: VmRecord) -> dict[str, Any]:
    """The inspect reply's body: the record, the live XML and libvirt's scalar counters."""
    counters = {}
    try:
        for _, values in conn.domainListGetStats([dom], 0, 0):
            counters = {k: v for k, v in values.items() if isinstance(v, (int, float, str, bool))}
    except libvirt.libvirtError:
        pass  # stats are a bonus; the test driver lacks some groups
    return {
        "id": record.instance_uuid,
        "externalId": record.external_id,
        "state": record.state,
        "labels": record.labels,
        "specHash": record.spec_hash,
        "xml": dom.XMLDesc(0),
        "stats": counters,
    }
