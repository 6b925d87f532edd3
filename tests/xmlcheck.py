"""Shared helpers for the domain XML tests: golden cases, canonical comparison, schema checks.

Golden cases are `tests/golden/NAME.json` → `tests/golden/NAME.xml`. A case's JSON is what
`herdsman render` reads (a bare virtualMachine, a Cattle instance or a whole Cattle event) plus
optional header keys, all starting with `_`, that pin the host the document is rendered for:

    "_comment":     what the case covers (free text)
    "_profile":     HostProfile fields, e.g. {"domain_type": "kvm", "machine": "pc-q35-7.1",
                    "session": false, "host_cpus": 4}
    "_policy":      HostPolicy/HostLayout fields: vnc_secret (text), network, bridge, vnc_listen,
                    tcg_tb_cache_mib, state_dir, log_dir, storage_pool
    "_macs":        the NIC MACs the controller allocated, in device order
    "_kernel_boot": a resolved kernel: image, {"kernel", "initrd", "cmdline"}

The VNC secret defaults to a fixed value so that the derived VNC passwords are stable.
"""

from __future__ import annotations

import difflib
import json
import re
import subprocess
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from lxml import etree

from agent.spec.cattle import spec_from_document
from agent.spec.vm import VirtualMachine
from drivers.libvirt.domxml.builder import render_xml
from drivers.libvirt.domxml.inputs import HostPolicy, KernelBoot, RenderInput
from drivers.libvirt.domxml.metadata import NAMESPACE
from drivers.libvirt.host_profile import HostProfile
from drivers.libvirt.layout import HostLayout

GOLDEN_DIR = Path(__file__).parent / "golden"
DOMAIN_SCHEMA = Path("/usr/share/libvirt/schemas/domain.rng")
GOLDEN_VNC_SECRET = "herdsman-golden-vnc-secret"
QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
NSMAP = {"h": NAMESPACE, "qemu": QEMU_NS}


@dataclass(frozen=True)
class GoldenCase:
    name: str
    json_path: Path
    document: Any  # the JSON without its header keys
    header: dict[str, Any]
    spec: VirtualMachine
    render_input: RenderInput

    @property
    def xml_path(self) -> Path:
        return self.json_path.with_suffix(".xml")

    @property
    def session(self) -> bool:
        return self.render_input.profile.session

    def render(self) -> str:
        return render_xml(self.render_input)

    def rerender(self, spec: VirtualMachine) -> str:
        """The same host and policy with another spec (for "this field changes nothing" checks)."""
        return render_xml(replace(self.render_input, spec=spec))


def _policy(header: Mapping[str, Any]) -> HostPolicy:
    raw = dict(header.get("_policy", {}))
    default = HostLayout()
    layout = HostLayout(
        state_dir=Path(raw.pop("state_dir", default.state_dir)),
        log_dir=Path(raw.pop("log_dir", default.log_dir)),
        storage_pool=raw.pop("storage_pool", default.storage_pool),
    )
    secret = raw.pop("vnc_secret", GOLDEN_VNC_SECRET)
    return HostPolicy(layout=layout, vnc_secret=secret.encode(), **raw)


def load_case(path: Path) -> GoldenCase:
    raw = json.loads(path.read_text())
    header = {k: raw.pop(k) for k in list(raw) if k.startswith("_")}
    spec = spec_from_document(raw)
    boot = header.get("_kernel_boot")
    render_input = RenderInput(
        spec=spec,
        profile=HostProfile(**header.get("_profile", {})),
        policy=_policy(header),
        macs=tuple(header.get("_macs", ())),
        kernel_boot=KernelBoot(**boot) if boot else None,
    )
    return GoldenCase(path.stem, path, raw, header, spec, render_input)


def golden_cases() -> list[GoldenCase]:
    return [load_case(p) for p in sorted(GOLDEN_DIR.glob("*.json"))]


# --- comparing documents ------------------------------------------------------------------


def parse(xml: str | bytes) -> etree._Element:
    data = xml.encode() if isinstance(xml, str) else xml
    return etree.fromstring(data, etree.XMLParser(resolve_entities=False, no_network=True))


def _strip_indentation(root: etree._Element) -> etree._Element:
    """Drop whitespace-only text between elements; leaf text (a description of " ") is content."""
    for element in root.iter():
        if len(element) and element.text is not None and not element.text.strip():
            element.text = None
        if element.tail is not None and not element.tail.strip():
            element.tail = None
    return root


def canonical(xml: str | bytes | etree._Element) -> str:
    root = parse(etree.tostring(xml)) if isinstance(xml, etree._Element) else parse(xml)
    return etree.tostring(_strip_indentation(root), method="c14n2").decode()


def pretty(xml: str | bytes | etree._Element) -> str:
    root = parse(canonical(xml))
    etree.indent(root, space="  ")
    return etree.tostring(root, encoding="unicode")


def xml_diff(expected: str, actual: str, names: tuple[str, str] = ("expected", "actual")) -> str:
    lines = difflib.unified_diff(pretty(expected).splitlines(), pretty(actual).splitlines(), *names, lineterm="")
    return "\n".join(lines)


def without_metadata(xml: str | bytes | etree._Element) -> etree._Element:
    """The document with herdsman's <metadata> removed: what libvirt and qemu act on."""
    root = parse(canonical(xml))
    for node in root.findall("metadata"):
        root.remove(node)
    return root


# --- libvirt's schema ---------------------------------------------------------------------

_STATUS_RE = re.compile(r"^(?P<path>.+?) (?P<status>validates|fails to validate)$")


def validate_domains(documents: Mapping[str, str]) -> dict[str, str]:
    """Check every document as `virt-xml-validate FILE domain` does, in one xmllint process.

    virt-xml-validate is a shell wrapper that runs `xmllint --noout --relaxng
    /usr/share/libvirt/schemas/domain.rng FILE` for one file; xmllint takes many files at once,
    which keeps a suite that checks hundreds of documents fast. Returns name → xmllint's
    messages for each document that fails (empty when all pass).
    """
    if not documents:
        return {}
    with tempfile.TemporaryDirectory(prefix="herdsman-xml-") as tmp:
        names: dict[str, str] = {}
        for index, (name, xml) in enumerate(documents.items()):
            file = Path(tmp) / f"{index:05d}.xml"
            file.write_text(xml, encoding="utf-8")
            names[str(file)] = name
        proc = subprocess.run(
            ["xmllint", "--noout", "--relaxng", str(DOMAIN_SCHEMA), *names],
            capture_output=True,
            text=True,
            check=False,
        )
    failures: dict[str, str] = {}
    passed: set[str] = set()
    pending: list[str] = []  # xmllint prints a file's errors, then its status line
    for line in proc.stderr.splitlines():
        match = _STATUS_RE.match(line)
        if match and match["path"] in names:
            if match["status"] == "validates":
                passed.add(match["path"])
            else:
                failures[names[match["path"]]] = "\n".join(pending)
            pending = []
        else:
            pending.append(line)
    for path, name in names.items():
        if path not in passed and name not in failures:
            failures[name] = f"no verdict from xmllint (exit {proc.returncode}): {proc.stderr[-2000:]}"
    return failures


def schema_report(failures: Mapping[str, str], documents: Mapping[str, str]) -> str:
    parts = []
    for name, errors in failures.items():
        parts.append(f"--- {name} fails libvirt's domain schema:\n{errors}\n{documents.get(name, '')}")
    return "\n".join(parts)
