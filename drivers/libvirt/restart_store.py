"""The restart policy's record in a domain's metadata, under a key of its own.

It changes at run time (a count, a pending restart, the controller's stop), independently of
the spec in herdsman's `<instance>` element, so it is written alone: a restart never rewrites
the stored spec, and a spec update never loses a count. The text is agent/restarts/record.py's
JSON. Synchronous libvirt calls: the driver runs them where it runs its others.
"""

from __future__ import annotations

import libvirt
from lxml import etree

from agent.restarts.record import RestartRecord, dumps, loads

NAMESPACE = "https://herdsman.dev/xmlns/restart/1"
KEY = "herdsman-restart"


def read_record(dom: libvirt.virDomain) -> RestartRecord | None:
    """The stored record; None when there is none. RecordError when it cannot be read."""
    try:
        xml = dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, NAMESPACE, 0)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN_METADATA:
            return None
        raise
    parser = etree.XMLParser(resolve_entities=False, no_network=True)
    return loads(etree.fromstring(xml.encode(), parser).text or "")


def write_record(dom: libvirt.virDomain, record: RestartRecord) -> None:
    """Into the persistent definition, and the live one when the domain runs."""
    element = etree.Element("record")
    element.text = dumps(record)
    flags = libvirt.VIR_DOMAIN_AFFECT_CONFIG | (libvirt.VIR_DOMAIN_AFFECT_LIVE if dom.isActive() else 0)
    dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, etree.tostring(element, encoding="unicode"),
                    KEY, NAMESPACE, flags)
