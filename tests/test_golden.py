"""Golden pairs: tests/golden/NAME.json renders to tests/golden/NAME.xml, and what each field does.

The comparison is semantic (canonical XML, indentation ignored); a mismatch prints a unified
diff of both documents pretty-printed. After an intended change to the output, regenerate the
expected files and review the diff before committing:

    UPDATE_GOLDEN=1 .venv/bin/pytest tests/test_golden.py

The tables at the end pin every field of the virtualMachine resource (and its nested types):
either its effect on the domain is there (an XPath on a golden document), or it has none, and
then its values do not appear outside herdsman's <metadata> and removing or changing the field
leaves the rest of the document unchanged.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

import pytest
from lxml import etree

from agent.spec.cattle import validate_spec
from agent.spec.vm import VirtualMachine
from drivers.libvirt.domxml.writer import display_text
from tests.xmlcheck import (
    GOLDEN_DIR,
    NSMAP,
    GoldenCase,
    canonical,
    golden_cases,
    parse,
    schema_report,
    validate_domains,
    without_metadata,
    xml_diff,
)

CASES = {case.name: case for case in golden_cases()}
UPDATE = os.environ.get("UPDATE_GOLDEN") == "1"


@pytest.fixture(scope="module")
def rendered() -> dict[str, str]:
    return {name: case.render() for name, case in CASES.items()}


def test_there_are_enough_golden_pairs() -> None:
    assert len(CASES) >= 12
    kinds = {_document_kind(case) for case in CASES.values()}
    assert kinds == {"virtualMachine", "cattle instance", "cattle event"}


def _document_kind(case: GoldenCase) -> str:
    doc = case.document
    if "data" in doc and "instanceHostMap" in doc["data"]:
        return "cattle event"
    return "cattle instance" if "kind" in doc else "virtualMachine"


@pytest.mark.parametrize("name", sorted(CASES))
def test_golden(name: str, rendered: dict[str, str]) -> None:
    case, actual = CASES[name], rendered[name]
    if UPDATE:
        case.xml_path.write_text(actual)
        return
    assert case.xml_path.exists(), f"{case.xml_path} is missing; run UPDATE_GOLDEN=1 pytest {__file__}"
    expected = case.xml_path.read_text()
    if canonical(expected) != canonical(actual):
        pytest.fail(f"{name}: rendered XML differs from {case.xml_path.name}\n{xml_diff(expected, actual)}")


def test_cattle_documents_read_columns_and_fields() -> None:
    instance = CASES["11-cattle-instance"].spec
    assert instance.memory_mb == 768  # the column wins over data.fields
    assert instance.userdata == "#cloud-config\nhostname: golden-from-column\n"
    # the serialised `ports` / `instanceLinks` relations (records) are not the resource's fields
    assert (instance.ports, instance.instance_links) == (["8080:80/tcp"], {})
    event = CASES["12-cattle-activate-event"].spec
    assert (event.uuid, event.name, event.vcpu, event.instance_links) == (f"{U}12", "golden-event", 2, None)


def test_no_orphan_expected_files() -> None:
    assert {p.stem for p in GOLDEN_DIR.glob("*.xml")} == set(CASES)


def test_goldens_pass_libvirt_schema(rendered: dict[str, str]) -> None:
    failures = validate_domains(rendered)
    assert not failures, schema_report(failures, rendered)


def test_batch_check_agrees_with_virt_xml_validate(tmp_path: Any, rendered: dict[str, str]) -> None:
    """The batch runner is `virt-xml-validate FILE domain` for many files: both say yes and no alike."""
    good = rendered["06-session-ports"]
    bad = good.replace('<vcpu placement="static">1</vcpu>', '<vcpu placement="static">one</vcpu>')
    assert bad != good
    verdicts = {}
    for label, xml in (("good", good), ("bad", bad)):
        path = tmp_path / f"{label}.xml"
        path.write_text(xml)
        verdicts[label] = subprocess.run(["virt-xml-validate", str(path), "domain"], capture_output=True, check=False).returncode
    assert verdicts["good"] == 0 and verdicts["bad"] != 0
    assert set(validate_domains({"good": good, "bad": bad})) == {"bad"}


# --- every field of the resource --------------------------------------------------------------

#: The virtualMachine resource's fields, as listed in its API page (the seed).
SEED_FIELDS = ["command", "count", "cpuSet", "cpuShares", "createIndex", "deploymentUnitUuid", "description", "disks", "dns", "dnsSearch", "domainName", "expose", "externalId", "extraHosts", "firstRunning", "healthCheck", "healthState", "hostId", "hostname", "id", "imageUuid", "instanceLinks", "labels", "logConfig", "memory", "memoryMb", "memorySwap", "name", "nativeContainer", "networkIds", "networkMode", "ports", "primaryIpAddress", "registryCredentialId", "requestedHostId", "restartPolicy", "securityOpt", "startCount", "startOnCreate", "systemContainer", "userdata", "vcpu", "version", "volumeDriver"]
NESTED_FIELDS = {
    "disks": ["name", "size", "root", "readIops", "writeIops", "driver", "opts"],
    "healthCheck": ["healthyThreshold", "initializingTimeout", "interval", "name", "port", "recreateOnQuorumStrategyConfig", "reinitializingTimeout", "requestLine", "responseTimeout", "strategy", "unhealthyThreshold"],
    "restartPolicy": ["maximumRetryCount", "name"],
    "logConfig": ["config", "driver"],
}


def _aliases(model: Any) -> set[str]:
    return {info.alias or name for name, info in type(model).model_fields.items() if name in model.model_fields_set}


def _fields_used() -> set[str]:
    """'vcpu', 'disks.readIops', 'healthCheck.recreateOnQuorumStrategyConfig.quorum', ... set by some golden."""
    used: set[str] = set()
    for case in CASES.values():
        spec = case.spec
        used |= _aliases(spec)
        for disk in spec.disks:
            used |= {f"disks.{a}" for a in _aliases(disk)}
        for key in ("health_check", "restart_policy", "log_config"):
            nested = getattr(spec, key)
            if nested is not None:
                alias = VirtualMachine.model_fields[key].alias
                used |= {f"{alias}.{a}" for a in _aliases(nested)}
        quorum = spec.health_check and spec.health_check.recreate_on_quorum_strategy_config
        if quorum:
            used |= {f"healthCheck.recreateOnQuorumStrategyConfig.{a}" for a in _aliases(quorum)}
    return used


def test_model_has_exactly_the_seed_fields() -> None:
    aliases = {info.alias or name for name, info in VirtualMachine.model_fields.items()}
    assert aliases - {"uuid"} == set(SEED_FIELDS)


def test_goldens_touch_every_field() -> None:
    wanted = set(SEED_FIELDS) | {f"{parent}.{child}" for parent, kids in NESTED_FIELDS.items() for child in kids}
    wanted.add("healthCheck.recreateOnQuorumStrategyConfig.quorum")
    assert wanted - _fields_used() == set()


@dataclass(frozen=True)
class Effect:
    field: str
    golden: str
    xpath: str
    expected: Any  # a value, or a function of the case


def _uuid(case: GoldenCase) -> str:
    return case.spec.instance_uuid


def _digest(case: GoldenCase) -> str:
    assert case.spec.userdata is not None
    return hashlib.sha256(case.spec.userdata.encode()).hexdigest()


def _labels(case: GoldenCase) -> str:
    return json.dumps(case.spec.labels, sort_keys=True, ensure_ascii=True, separators=(",", ":"))


U = "901de000-0000-4000-8000-0000000000"
EFFECTS = [
    Effect("uuid", "02-disk-image-implied-root", "string(/domain/uuid)", f"{U}02"),
    Effect("uuid", "02-disk-image-implied-root", "string(/domain/name)", f"{U}02"),
    Effect("name", "10-xml-special-text", "string(/domain/title)", lambda c: display_text(c.spec.name)),
    Effect("description", "10-xml-special-text", "string(/domain/description)", lambda c: display_text(c.spec.description)),
    Effect("vcpu", "02-disk-image-implied-root", "string(/domain/vcpu)", "2"),
    Effect("memoryMb", "02-disk-image-implied-root", "string(/domain/memory[@unit='KiB'])", "1048576"),
    Effect("memoryMb", "02-disk-image-implied-root", "string(/domain/currentMemory[@unit='KiB'])", "1048576"),
    Effect("memoryMb", "11-cattle-instance", "string(/domain/memory)", "786432"),  # the column wins
    Effect("cpuSet", "08-kvm-tuning", "string(/domain/vcpu/@cpuset)", "0-1,3"),
    Effect("cpuShares", "08-kvm-tuning", "string(/domain/cputune/shares)", "2048"),
    Effect("memory", "08-kvm-tuning", "string(/domain/memtune/hard_limit[@unit='KiB'])", "2359296"),
    Effect("memorySwap", "08-kvm-tuning", "string(/domain/memtune/swap_hard_limit[@unit='KiB'])", "4718592"),
    Effect("memorySwap", "09-security-restart", "count(/domain/memtune/swap_hard_limit)", 0.0),  # -1: unlimited
    Effect("imageUuid", "02-disk-image-implied-root", "string(//disk[boot/@order='1']/source/@volume)", f"{U}02-root.qcow2"),
    Effect("imageUuid", "03-kernel-command", "string(/domain/os/kernel)", "/var/lib/herdsman/kernels/f9da87ded917b18cba007e21/kernel"),
    Effect("imageUuid", "03-kernel-command", "string(/domain/os/initrd)", "/var/lib/herdsman/kernels/f9da87ded917b18cba007e21/initrd"),
    Effect("imageUuid", "14-kernel-resolved", "string(/domain/os/cmdline)", "console=ttyS0 root=/dev/vda quiet"),
    Effect("command", "03-kernel-command", "string(/domain/os/cmdline)", "console=ttyS0 quiet panic=-1 herdsman.golden=1"),
    Effect("disks.name", "13-many-disks", "string(//disk[serial='data2']/source/@volume)", f"{U}13-data2.qcow2"),
    Effect("disks.root", "13-many-disks", "string(//disk[boot/@order='1']/target/@dev)", "vda"),
    Effect("disks.root", "13-many-disks", "string(//disk[boot/@order='1']/serial)", "boot"),
    Effect("disks.readIops", "13-many-disks", "string(//disk[serial='data1']/iotune/read_iops_sec)", "100"),
    Effect("disks.writeIops", "13-many-disks", "string(//disk[serial='data2']/iotune/write_iops_sec)", "200"),
    Effect("disks.driver", "13-many-disks", "string(//disk[serial='data2']/source/@pool)", "fastpool"),
    Effect("disks.opts", "07-q35-sata-scsi", "string(//disk[serial='logs']/driver/@cache)", "writeback"),
    Effect("disks.opts", "07-q35-sata-scsi", "string(//disk[serial='logs']/driver/@discard)", "ignore"),
    Effect("disks.opts", "07-q35-sata-scsi", "string(//disk[serial='logs']/target/@bus)", "scsi"),
    Effect("disks.opts", "07-q35-sata-scsi", "count(//controller[@type='scsi'][@model='virtio-scsi'])", 1.0),
    Effect("disks.opts", "07-q35-sata-scsi", "string(//disk[serial='db']/driver/@type)", "raw"),
    Effect("volumeDriver", "13-many-disks", "string(//disk[serial='data1']/source/@pool)", "bulkpool"),
    Effect("networkMode", "02-disk-image-implied-root", "string(//interface[@type='network']/source/@network)", "default"),
    Effect("networkMode", "04-network-bridge", "count(//interface[@type='bridge'][source/@bridge='br-lan'])", 2.0),
    Effect("networkMode", "05-network-none", "count(//interface) + count(//qemu:arg)", 0.0),
    Effect(
        "ports",
        "06-session-ports",
        "string(//qemu:arg[starts-with(@value, 'user,')]/@value)",
        "user,id=hostnet0,hostfwd=tcp:127.0.0.1:8080-:80,hostfwd=tcp:127.0.0.1:443-:443,"
        "hostfwd=udp:127.0.0.1:5353-:53,hostfwd=tcp:0.0.0.0:2222-:22",
    ),
    Effect("labels", "12-cattle-activate-event", "string(/domain/metadata/h:instance/h:labels)", _labels),
    Effect("labels", "10-xml-special-text", "string(/domain/metadata/h:instance/h:labels)", _labels),
    Effect("userdata", "02-disk-image-implied-root", "string(/domain/metadata/h:instance/h:userdataDigest)", _digest),
    Effect("logConfig.driver", "03-kernel-command", "count(//serial/log)", 0.0),
    Effect("logConfig.driver", "09-security-restart", "string(//serial/log/@file)", lambda c: f"/var/log/herdsman/console/{_uuid(c)}.log"),
    Effect("logConfig.driver", "05-network-none", "string(//serial/log/@file)", lambda c: f"/var/log/herdsman/console/{_uuid(c)}.log"),
    Effect("securityOpt", "09-security-restart", "string(/domain/seclabel/@type)", "none"),
]


@pytest.mark.parametrize("effect", EFFECTS, ids=lambda e: f"{e.field}@{e.golden}")
def test_field_effect(effect: Effect, rendered: dict[str, str]) -> None:
    case = CASES[effect.golden]
    expected = effect.expected(case) if callable(effect.expected) else effect.expected
    assert parse(rendered[effect.golden]).xpath(effect.xpath, namespaces=NSMAP) == expected


_DROP = object()


@dataclass(frozen=True)
class NoEffect:
    field: str  # dotted path into the spec's API form, e.g. "disks.2.size"
    golden: str
    why: str
    markers: tuple[str, ...] = ()  # text of the value that must not appear in the domain
    other: Any = _DROP  # the value to compare against (default: the field left out)
    in_metadata: bool = True  # False: not even the stored spec keeps it


NO_EFFECT = [
    NoEffect("expose", "06-session-ports", "documents guest ports; publishing is `ports`", ("9464", "9466/udp")),
    NoEffect("ports", "11-cattle-instance", "published on the host outside libvirt (only session mode uses hostfwd)", ("8080",)),
    NoEffect("networkIds", "04-network-bridge", "the controller's network references; the host network is the agent's", ("1n1717", "1n1718")),
    NoEffect("healthCheck", "11-cattle-instance", "probes run by the agent from the host", ("golden-http-check", "8089", "/healthz")),
    NoEffect("healthCheck", "12-cattle-activate-event", "probes run by the agent from the host"),
    NoEffect("restartPolicy.maximumRetryCount", "12-cattle-activate-event", "counted by the agent's restart loop", (), 0),
    NoEffect("restartPolicy.name", "09-security-restart", "applied by the agent; every crash stops the domain", (), "no"),
    NoEffect("restartPolicy.name", "05-network-none", "applied by the agent; every crash stops the domain", (), "always"),
    NoEffect("registryCredentialId", "11-cattle-instance", "credentials for the image download", ("1rc9",)),
    NoEffect("startOnCreate", "02-disk-image-implied-root", "whether the agent starts the defined domain", (), True),
    NoEffect("userdata", "02-disk-image-implied-root", "cloud-init seed content; only its digest is kept", ("golden-userdata-marker",)),
    NoEffect("hostname", "02-disk-image-implied-root", "cloud-init seed (meta-data local-hostname)", ("golden-web",)),
    NoEffect("domainName", "02-disk-image-implied-root", "cloud-init seed", ()),
    NoEffect("dns", "02-disk-image-implied-root", "cloud-init seed (network-config)", ("192.0.2.53", "2001:db8::53")),
    NoEffect("dnsSearch", "02-disk-image-implied-root", "cloud-init seed (network-config)", ("corp.example", "golden.example.internal")),
    NoEffect("extraHosts", "02-disk-image-implied-root", "cloud-init seed (/etc/hosts)", ("goldendb", "192.0.2.77")),
    NoEffect("disks.0.size", "13-many-disks", "the volume's capacity, set by the storage layer", (), "2g"),
    NoEffect("securityOpt", "15-policy-overrides", "label=dynamic is libvirt's default", ("dynamic",), []),
    NoEffect("logConfig.config", "12-cattle-activate-event", "per-VM rotation keys are refused; only {} passes", ()),
    NoEffect("id", "16-controller-fields", "controller bookkeeping", ("1i9161",), in_metadata=False),
    NoEffect("hostId", "16-controller-fields", "controller bookkeeping", ("1h9162",), in_metadata=False),
    NoEffect("externalId", "16-controller-fields", "set by the agent in its reply, never read back", ("ext-9163",), in_metadata=False),
    NoEffect("count", "16-controller-fields", "scheduling: the controller creates count instances", ("9164",), in_metadata=False),
    NoEffect("count", "11-cattle-instance", "scheduling: the controller creates count instances", ("7919",), in_metadata=False),
    NoEffect("requestedHostId", "16-controller-fields", "scheduling", ("1h9165",), in_metadata=False),
    NoEffect("createIndex", "16-controller-fields", "controller bookkeeping", ("9166",), in_metadata=False),
    NoEffect("deploymentUnitUuid", "16-controller-fields", "controller bookkeeping", ("0e5a9167",), in_metadata=False),
    NoEffect("firstRunning", "16-controller-fields", "controller bookkeeping", ("2016-01-02",), in_metadata=False),
    NoEffect("healthState", "16-controller-fields", "reported by the agent, never read back", (), in_metadata=False),
    NoEffect("nativeContainer", "16-controller-fields", "controller bookkeeping", (), in_metadata=False),
    NoEffect("primaryIpAddress", "16-controller-fields", "set by the controller from the NIC's IP", ("10.42.91.68",), in_metadata=False),
    NoEffect("primaryIpAddress", "12-cattle-activate-event", "set by the controller from the NIC's IP", ("10.42.12.12",), in_metadata=False),
    NoEffect("startCount", "16-controller-fields", "controller bookkeeping", ("9169",), in_metadata=False),
    NoEffect("systemContainer", "16-controller-fields", "controller bookkeeping", ("golden-system-container",), in_metadata=False),
    NoEffect("version", "16-controller-fields", "controller bookkeeping", ("v9170",), in_metadata=False),
    NoEffect("instanceLinks", "11-cattle-instance", "links are refused unless empty", (), in_metadata=False),
]


def _set_path(document: dict, path: str, value: Any) -> None:
    *parents, last = path.split(".")
    node: Any = document
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    if value is _DROP:
        node.pop(last, None)
    else:
        node[last] = value


@pytest.mark.parametrize("entry", NO_EFFECT, ids=lambda e: f"{e.field}@{e.golden}")
def test_field_without_effect(entry: NoEffect, rendered: dict[str, str]) -> None:
    case = CASES[entry.golden]
    xml = rendered[entry.golden]
    outside = etree.tostring(without_metadata(xml), encoding="unicode")
    for marker in entry.markers:
        assert marker not in outside, f"{entry.field} ({entry.why}) shows {marker!r} in the domain"
        if not entry.in_metadata:
            assert marker not in xml, f"{entry.field} ({entry.why}) reached herdsman's metadata"
    document = case.spec.model_dump(mode="json", by_alias=True)
    head = entry.field.split(".")[0]
    assert document.get(head) is not None or head in case.spec.model_fields_set, f"{entry.golden} does not set {head}"
    _set_path(document, entry.field, entry.other)
    changed: VirtualMachine = validate_spec(document)
    assert changed.model_dump() != case.spec.model_dump(), f"changing {entry.field} changed nothing in the spec; the check proves nothing"
    assert canonical(without_metadata(case.rerender(changed))) == canonical(without_metadata(xml)), (
        f"{entry.field} ({entry.why}) changes the domain"
    )


def test_every_field_is_classified() -> None:
    """Each field and nested field has a row above: an effect, or none (with the reason)."""
    fields = [e.field for e in EFFECTS] + [n.field for n in NO_EFFECT]
    rows = {re.sub(r"\.\d+(?=\.|$)", "", field) for field in fields}
    assert set(SEED_FIELDS) - {row.split(".")[0] for row in rows} == set()
    whole = {n.field for n in NO_EFFECT if "." not in n.field}  # no effect at all, nested fields included
    missing = {
        f"{parent}.{kid}"
        for parent, kids in NESTED_FIELDS.items()
        for kid in kids
        if f"{parent}.{kid}" not in rows and parent not in whole
    }
    assert missing == set()


def test_golden_cases_are_what_herdsman_render_prints(tmp_path: Any) -> None:
    """The CLI and the test loader agree for a header-free golden (default host, pool, secret aside)."""
    case = CASES["01-minimal"]
    path = tmp_path / "minimal.json"
    path.write_text(json.dumps(case.document))
    proc = subprocess.run(
        [sys.executable, "-m", "agent", "render", str(path)], capture_output=True, text=True, check=True
    )
    assert without_metadata(proc.stdout).findtext("uuid") == case.spec.instance_uuid
    cli = parse(proc.stdout)
    golden = parse(case.render())
    for node in (cli, golden):  # only the VNC password depends on the (CLI-less) secret
        node.find("devices/graphics").attrib.pop("passwd")
    assert canonical(cli) == canonical(golden)

