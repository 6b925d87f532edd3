"""herdsman's `<metadata>` element: written into every domain, parsed back on adoption.

User-written values (labels, the stored spec) are kept as JSON text with every non-ASCII and
control character escaped, so any string survives XML 1.0 — which cannot hold most control
characters even as character references — and parses back unchanged.
"""

from __future__ import annotations

import json

from lxml import etree

from drivers.libvirt.domxml.model import AgentMetadata

NAMESPACE = "https://herdsman.dev/xmlns/domain/1"
PREFIX = "herdsman"
KEY = PREFIX  # the key libvirt's setMetadata() wants for our namespace
FORMAT_VERSION = 1

_Q = "{%s}%%s" % NAMESPACE


def _json(value: object) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=True, separators=(",", ":"))


def metadata_element(meta: AgentMetadata) -> etree._Element:
    root = etree.Element(_Q % "instance", nsmap={PREFIX: NAMESPACE})
    root.set("format", str(meta.format_version))
    for tag, text in (
        ("uuid", meta.instance_uuid),
        ("specHash", meta.spec_hash),
        ("labels", _json(meta.labels)),
        ("spec", _json(meta.spec)),
        ("userdataDigest", meta.userdata_digest),
    ):
        if text is not None:
            etree.SubElement(root, _Q % tag).text = text
    return root


def metadata_xml(meta: AgentMetadata) -> str:
    """The element alone, as `virDomain.setMetadata` takes it."""
    return etree.tostring(metadata_element(meta), encoding="unicode")


class NotOurs(ValueError):
    """The domain carries no herdsman metadata: a foreign domain, left alone."""


def parse_metadata(xml: str | bytes | etree._Element) -> AgentMetadata:
    """Our element out of a whole domain XML, or the element itself (`virDomain.metadata`)."""
    if isinstance(xml, (str, bytes)):
        parser = etree.XMLParser(resolve_entities=False, no_network=True, huge_tree=False)
        xml = etree.fromstring(xml.encode() if isinstance(xml, str) else xml, parser)
    node = xml if xml.tag == _Q % "instance" else xml.find(f"metadata/{_Q % 'instance'}")
    if node is None:
        raise NotOurs("no herdsman metadata")
    version = int(node.get("format", "0"))
    if version > FORMAT_VERSION:
        raise NotOurs(f"herdsman metadata format {version} is newer than this agent's {FORMAT_VERSION}")

    def text(tag: str) -> str | None:
        child = node.find(_Q % tag)
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
        format_version=version,
    )
