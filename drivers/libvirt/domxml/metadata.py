"""herdsman's `<metadata>` element: written into every domain, parsed back on adoption.

User-written values (labels, the stored spec) are kept as JSON text with every non-ASCII and
control character escaped, so any string survives XML 1.0 — which cannot hold most control
characters even as character references — and parses back unchanged.
"""

from __future__ import annotations

import json

from lxml import etree

from drivers.libvirt.domxml.model import AgentMetadata
from drivers.ports.model import PortBinding, bindings_from_json, bindings_to_json

NAMESPACE = "https://herdsman.dev/xmlns/domain/1"
PREFIX = "herdsman"
KEY = PREFIX  # the key libvirt's setMetadata() wants for our namespace
FORMAT_VERSION = 1

_Q = "{%s}%%s" % NAMESPACE


def _json(value: object) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=True, separators=(",", ":"))


def metadata_element(meta: AgentMetadata, *, qualified: bool = True) -> etree._Element:
    """The element for a whole domain document (qualified) or for setMetadata (unqualified:
    libvirt puts it into our namespace itself and refuses an element that declares it)."""
    q = _Q if qualified else "%s"
    root = etree.Element(q % "instance", nsmap={PREFIX: NAMESPACE} if qualified else None)
    root.set("format", str(meta.format_version))
    for tag, text in (
        ("uuid", meta.instance_uuid),
        ("specHash", meta.spec_hash),
        ("labels", _json(meta.labels)),
        ("spec", _json(meta.spec)),
        ("userdataDigest", meta.userdata_digest),
        ("ports", bindings_to_json(meta.ports) if meta.ports else None),
    ):
        if text is not None:
            etree.SubElement(root, q % tag).text = text
    return root


def metadata_xml(meta: AgentMetadata) -> str:
    """The element alone, as `virDomain.setMetadata` takes it (with KEY and NAMESPACE)."""
    return etree.tostring(metadata_element(meta, qualified=False), encoding="unicode")


def _ports(text: str | None) -> tuple[PortBinding, ...]:
    """The VM's port bindings; unreadable ones (a hand-edited domain) are dropped, not the VM:
    the next activate allocates its ports again."""
    try:
        return bindings_from_json(text)
    except ValueError:
        return ()


class NotOurs(ValueError):
    """The domain carries no herdsman metadata: a foreign domain, left alone."""


def parse_metadata(xml: str | bytes | etree._Element) -> AgentMetadata:
    """Our element out of a whole domain XML, or the element itself (`virDomain.metadata`).

    `virDomain.metadata(VIR_DOMAIN_METADATA_ELEMENT, NAMESPACE)` answers with the element
    stripped of its namespace (`<instance format="1"><uuid>...`): libvirt already selected it
    by namespace, so an unqualified `instance` root is read as ours.
    """
    if isinstance(xml, (str, bytes)):
        parser = etree.XMLParser(resolve_entities=False, no_network=True, huge_tree=False)
        xml = etree.fromstring(xml.encode() if isinstance(xml, str) else xml, parser)
    qualify = "%s" if xml.tag == "instance" else _Q
    node = xml if xml.tag in ("instance", _Q % "instance") else xml.find(f"metadata/{_Q % 'instance'}")
    if node is None:
        raise NotOurs("no herdsman metadata")
    version = int(node.get("format", "0"))
    if version > FORMAT_VERSION:
        raise NotOurs(f"herdsman metadata format {version} is newer than this agent's {FORMAT_VERSION}")

    def text(tag: str) -> str | None:
        child = node.find(qualify % tag)
        return None if child is None else (child.text or "")

    uuid = text("uuid")
    if not uuid:
        raise NotOurs("herdsman metadata without an instance uuid")
    return AgentMetadata(
        instance_uuid=uuid,
        spec_hash=text("specHash") or "",
        spec=json.loads(text("spec") or "{}"),
        labels=json.loads(text("labels") or "{}"),
        userdata_digest=text("userdataDigest"),
        ports=_ports(text("ports")),
        format_version=version,
    )
