"""Generated valid virtualMachine documents: all render to schema-valid XML and keep their text.

Each example is checked in-process against libvirt's domain.rng (lxml uses the same libxml2
RelaxNG engine as xmllint, so a failure shrinks to a small spec); at the end every generated
document is checked once more, in one batch, exactly as `virt-xml-validate FILE domain` does.
"""

from __future__ import annotations

import hashlib
import json
import os
import string
from typing import Any, Literal

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lxml import etree

from agent.spec.cattle import spec_from_document, validate_spec
from agent.spec.fields import parse_port_spec
from agent.spec.vm import STORED_SPEC_EXCLUDE
from drivers.libvirt.domxml.builder import render_xml
from drivers.libvirt.domxml.inputs import HostPolicy, RenderInput
from drivers.libvirt.domxml.metadata import parse_metadata
from drivers.libvirt.domxml.writer import display_text
from drivers.libvirt.host_profile import HostProfile
from tests.xmlcheck import DOMAIN_SCHEMA, schema_report, validate_domains

EXAMPLES = int(os.environ.get("HERDSMAN_PROPERTY_EXAMPLES", "40"))
POLICY = HostPolicy(vnc_secret=b"property")
PROFILES = [
    HostProfile(host_cpus=64),
    HostProfile(machine="pc-q35-7.1", host_cpus=64),
    HostProfile(domain_type="kvm", host_cpus=64),
    HostProfile(session=True, host_cpus=64),
]
MIB = 1 << 20
SCHEMA = etree.RelaxNG(etree.parse(str(DOMAIN_SCHEMA)))

# --- text --------------------------------------------------------------------------------------

NASTY = ["<", ">", "&", "'", '"', "]]>", "<!--", "&amp;", "\r\n", "\t", "\x00", "\x01", "\x1b", "\x7f", "\x85",
         "\u2028", "\ufffe", "\uffff", "ü", "日本", "😀", "\u202e", " "]


def _text(*, single_line: bool, max_size: int) -> st.SearchStrategy[str]:
    blocked: list[Literal["Cs", "Cc"]] = ["Cs", "Cc"] if single_line else ["Cs"]
    pieces = st.one_of(
        st.sampled_from([p for p in NASTY if not (single_line and any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in p))]),
        st.text(st.characters(blacklist_categories=blocked), max_size=8),
    )
    return st.lists(pieces, max_size=12).map("".join).filter(lambda s: len(s) <= max_size)


names = _text(single_line=True, max_size=255)
texts = _text(single_line=False, max_size=2000)

# --- field values ------------------------------------------------------------------------------

_alnum = string.ascii_lowercase + string.digits
labels_dns = st.from_regex(r"\A[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?\Z")
hostnames = st.lists(labels_dns, min_size=1, max_size=3).map(".".join)
ipv4 = st.ip_addresses(v=4).map(str)
ips = st.ip_addresses().map(str)
ports = st.integers(1, 65535)
label_keys = st.from_regex(r"\A[A-Za-z0-9]([A-Za-z0-9._/:-]{0,20}[A-Za-z0-9])?\Z")
references = st.one_of(st.integers(1, 10**6), st.from_regex(r"\A1[a-z]{1,2}[0-9]{1,5}\Z"))
pool_names = st.from_regex(r"\A[a-z][a-z0-9_.-]{0,10}\Z")
digest = st.sampled_from(["", "#sha256=" + "a" * 64, "#sha512=" + "0" * 128, "#" + "f" * 32])
urls = st.tuples(
    st.sampled_from(["file:///var/lib/images/", "https://images.example.internal/", "http://10.0.0.1:8080/img/"]),
    st.from_regex(r"\A[a-z0-9][a-z0-9._-]{0,20}\Z"),
    digest,
).map(lambda t: t[0] + t[1] + t[2])
sizes = st.one_of(
    st.integers(1, 1 << 20).map(lambda n: f"{n}m"),
    st.integers(1, 1024).map(lambda n: f"{n}g"),
    st.integers(MIB, 1 << 40).map(str),
    st.sampled_from(["1.5g", "3GiB", "2048MB", "1t", "64t"]),
)


@st.composite
def port_specs(draw: st.DrawFn, session: bool) -> str:
    guest = draw(ports)
    proto = draw(st.sampled_from(["tcp", "udp"] if session else ["tcp", "udp", "sctp"]))
    suffix = draw(st.sampled_from(["", f"/{proto}"])) if proto == "tcp" else f"/{proto}"
    host_port = draw(st.one_of(st.none(), ports))
    host_ip = draw(st.one_of(st.none(), ipv4 if session else ips))
    if host_ip is None:
        return f"{host_port}:{guest}{suffix}" if host_port else f"{guest}{suffix}"
    address = f"[{host_ip}]" if ":" in host_ip else host_ip
    return f"{address}:{host_port or ''}:{guest}{suffix}"


@st.composite
def disks(draw: st.DrawFn, image_kind: str | None) -> list[dict]:
    disk_names = draw(st.lists(st.from_regex(r"\A[a-z0-9]([a-z0-9_.-]{0,6}[a-z0-9])?\Z"), max_size=5, unique=True))
    root_index = draw(st.one_of(st.none(), st.integers(0, max(len(disk_names) - 1, 0))))
    out = []
    for index, name in enumerate(disk_names):
        disk: dict[str, Any] = {"name": name}
        is_root = index == root_index and image_kind != "kernel"
        optional = {
            "size": sizes,
            "readIops": st.integers(0, 10**9),
            "writeIops": st.integers(0, 10**9),
            "driver": pool_names,
            "opts": st.fixed_dictionaries(
                {},
                optional={
                    "format": st.sampled_from(["qcow2"] if is_root and image_kind else ["qcow2", "raw"]),
                    "bus": st.sampled_from(["virtio", "scsi", "sata"]),
                    "cache": st.sampled_from(["none", "writeback", "writethrough", "directsync", "unsafe"]),
                    "discard": st.sampled_from(["unmap", "ignore"]),
                },
            ),
        }
        disk.update(draw(st.fixed_dictionaries({}, optional=optional)))
        if is_root:
            disk["root"] = True
        elif draw(st.booleans()):
            disk["root"] = False
        out.append(disk)
    return out


health_checks = st.one_of(
    st.fixed_dictionaries(
        {"port": ports},
        optional={
            "name": names,
            "requestLine": st.tuples(st.sampled_from(["GET", "HEAD", "POST", "OPTIONS"]), st.from_regex(r"\A/[!$-&(-\[\]-~]{0,20}\Z"),  # not " # ' \ (HAProxy syntax)
                                     st.sampled_from(["", " HTTP/1.0", " HTTP/1.1"])).map(lambda t: f"{t[0]} {t[1]}{t[2]}"),
            "interval": st.integers(100, 86_400_000),
            "responseTimeout": st.integers(0, 86_400_000),
            "initializingTimeout": st.integers(0, 86_400_000),
            "reinitializingTimeout": st.integers(0, 86_400_000),
            "healthyThreshold": st.integers(1, 100),
            "unhealthyThreshold": st.integers(1, 100),
            "strategy": st.sampled_from(["none", "recreate"]),
        },
    ),
    st.fixed_dictionaries(
        {"port": ports, "strategy": st.just("recreateOnQuorum"), "recreateOnQuorumStrategyConfig": st.fixed_dictionaries({"quorum": st.integers(1, 1000)})}
    ),
)
restart_policies = st.one_of(
    st.fixed_dictionaries({}, optional={"name": st.sampled_from(["no", "always", "unless-stopped"])}),
    st.fixed_dictionaries({"name": st.just("on-failure")}, optional={"maximumRetryCount": st.integers(0, 10000)}),
)
log_configs = st.fixed_dictionaries({}, optional={"driver": st.sampled_from(["file", "json-file", "none"]), "config": st.just({})})


@st.composite
def documents(draw: st.DrawFn) -> tuple[dict, HostProfile]:
    profile = draw(st.sampled_from(PROFILES))
    image_kind = draw(st.sampled_from([None, "disk", "kernel"]))
    doc: dict[str, Any] = {}
    if image_kind:
        url = draw(urls)
        doc["imageUuid"] = f"kernel:{url}" if image_kind == "kernel" else url
    if image_kind == "kernel" and draw(st.booleans()):
        doc["command"] = draw(st.lists(st.from_regex(r"\A[!#-~]{1,20}\Z"), min_size=1, max_size=6))
    memory_mb = draw(st.integers(16, 4 << 20))
    doc["memoryMb"] = memory_mb
    if draw(st.booleans()):
        memory = memory_mb * MIB + 64 * MIB + draw(st.integers(0, 1 << 34))
        doc["memory"] = memory
        swap = draw(st.one_of(st.none(), st.just(-1), st.integers(memory, memory + (1 << 36))))
        if swap is not None:
            doc["memorySwap"] = swap
    elif draw(st.booleans()):
        doc["memorySwap"] = -1
    cpus = st.lists(st.integers(0, 63), min_size=1, max_size=6).map(lambda xs: ",".join(map(str, xs)))
    optional: dict[str, st.SearchStrategy[Any]] = {
        "uuid": st.uuids().map(str),
        "name": names,
        "description": texts,
        "vcpu": st.integers(1, 255),
        "cpuSet": st.one_of(cpus, st.tuples(st.integers(0, 31), st.integers(0, 32)).map(lambda t: f"{t[0]}-{t[0] + t[1]}")),
        "cpuShares": st.integers(2, 262144),
        "disks": disks(image_kind),
        "volumeDriver": pool_names,
        "registryCredentialId": references,
        "userdata": texts,
        "hostname": hostnames,
        "domainName": hostnames,
        "dns": st.lists(ips, max_size=3),
        "dnsSearch": st.lists(hostnames, max_size=6),
        "extraHosts": st.lists(st.tuples(hostnames, ips).map(":".join), max_size=4),
        "networkMode": st.sampled_from(["managed", "bridge", "none"]),
        "networkIds": st.lists(references, max_size=3),
        "ports": st.lists(port_specs(profile.session), max_size=4),
        "expose": st.lists(st.tuples(ports, st.integers(0, 10), st.sampled_from(["", "/tcp", "/udp", "/sctp"])).map(
            lambda t: f"{t[0]}-{min(t[0] + t[1], 65535)}{t[2]}" if t[1] else f"{t[0]}{t[2]}"), max_size=3),
        "labels": st.dictionaries(label_keys, texts, max_size=5),
        "logConfig": log_configs,
        "healthCheck": health_checks,
        "restartPolicy": restart_policies,
        "securityOpt": st.lists(st.sampled_from(["label=disable", "label=dynamic"]), max_size=2, unique=True),
        "startOnCreate": st.booleans(),
        "count": st.integers(0, 100),
        "requestedHostId": references,
        "instanceLinks": st.one_of(st.none(), st.just({})),
        "createIndex": st.integers(0, 100),
        "deploymentUnitUuid": st.uuids().map(str),
        "externalId": st.from_regex(r"\A[a-z0-9-]{1,30}\Z"),
        "firstRunning": st.one_of(st.none(), st.integers(0, 2**41), st.just("2016-01-02T03:04:05Z")),
        "healthState": st.sampled_from(["healthy", "unhealthy", "initializing"]),
        "hostId": references,
        "id": references,
        "nativeContainer": st.booleans(),
        "primaryIpAddress": ipv4,
        "startCount": st.integers(0, 100),
        "systemContainer": st.one_of(st.none(), st.just("NetworkAgent")),
        "version": st.just("0"),
    }
    doc.update(draw(st.fixed_dictionaries({}, optional=optional)))
    return doc, profile


# --- the property ------------------------------------------------------------------------------


def _check_round_trip(doc: dict, xml: str) -> None:
    spec = validate_spec(doc)
    root = etree.fromstring(xml.encode())
    meta = parse_metadata(xml)
    assert meta.instance_uuid == spec.instance_uuid == root.findtext("uuid")
    assert meta.labels == spec.labels == doc.get("labels", {})
    assert meta.spec == spec.model_dump(mode="json", by_alias=True, exclude_none=True, exclude=STORED_SPEC_EXCLUDE | {"labels"})
    assert meta.spec.get("name") == doc.get("name") and meta.spec.get("description") == doc.get("description")
    userdata = doc.get("userdata")
    assert meta.userdata_digest == (hashlib.sha256(userdata.encode()).hexdigest() if userdata is not None else None)
    assert root.findtext("title") == (display_text(doc["name"]) if doc.get("name") else None)
    assert root.findtext("description") == (display_text(doc["description"]) if doc.get("description") else None)
    # the API form of a validated spec is valid again and means the same (normalisation is stable)
    assert validate_spec(spec.to_api()).model_dump() == spec.model_dump()


def test_generated_specs_render_to_valid_xml_and_keep_their_text() -> None:
    rendered: dict[str, str] = {}

    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(documents())
    def check(case: tuple[dict, HostProfile]) -> None:
        doc, profile = case
        spec = spec_from_document(json.loads(json.dumps(doc)))  # what arrives over the wire
        xml = render_xml(RenderInput(spec=spec, profile=profile, policy=POLICY))
        assert SCHEMA.validate(etree.fromstring(xml.encode())), f"{SCHEMA.error_log}\n{xml}"
        _check_round_trip(doc, xml)
        rendered[f"example-{len(rendered)}: {json.dumps(doc)[:300]}"] = xml

    check()
    assert len(rendered) >= EXAMPLES // 2
    failures = validate_domains(rendered)
    assert not failures, schema_report(failures, rendered)


@given(port_specs(session=False))
@settings(max_examples=60, deadline=None)
def test_port_text_is_canonical_and_reads_back(text: str) -> None:
    """A stored spec keeps ports in canonical text, which must parse to the same publication."""
    canonical = validate_spec({"ports": [text]}).ports[0]
    assert parse_port_spec(canonical) == parse_port_spec(text)
    assert validate_spec({"ports": [canonical]}).ports == [canonical]


def test_port_text_keeps_an_empty_host_port() -> None:
    assert validate_spec({"ports": ["127.0.0.1::80", "[::1]::53/udp"]}).ports == ["127.0.0.1::80/tcp", "[::1]::53/udp"]
