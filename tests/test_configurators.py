"""Each configurator on its own, on a fresh domain model (table-driven), and herdsman's metadata."""

from __future__ import annotations

import hashlib
import uuid as uuid_module
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from lxml import etree

from agent.spec.cattle import validate_spec
from agent.spec.vm import SPEC_UUID_NAMESPACE, STORED_SPEC_EXCLUDE
from drivers.libvirt.domxml import builder, metadata
from drivers.libvirt.domxml.configurators import (
    boot,
    console,
    cpu,
    disks,
    identity,
    lifecycle,
    memory,
    network,
    seed,
)
from drivers.libvirt.domxml.inputs import (
    HostPolicy,
    KernelBoot,
    RenderError,
    RenderInput,
    derived_mac,
)
from drivers.libvirt.domxml.model import AgentMetadata, Domain, OsBoot
from drivers.libvirt.host_profile import HostProfile
from drivers.libvirt.layout import HostLayout

UUID = "1b4e28ba-2fa1-41d2-883f-0016d3cca427"
IMG = "file:///var/lib/images/debian-12.qcow2"
MANIFEST = "file:///srv/herdsman/images/test-guest/manifest.json"
LAYOUT = HostLayout(state_dir=Path("/srv/hm/state"), log_dir=Path("/srv/hm/log"), storage_pool="pool0")
POLICY = HostPolicy(layout=LAYOUT, network="net0", bridge="br9", vnc_listen="127.0.0.2", vnc_secret=b"s3cret")
PC = HostProfile()
Q35 = HostProfile(machine="pc-q35-7.1")
KVM = HostProfile(domain_type="kvm", host_cpus=4)
SESSION = HostProfile(session=True)


def make_input(spec: dict | None = None, profile: HostProfile = PC, **kw: Any) -> RenderInput:
    document = {"uuid": UUID, **(spec or {})}
    return RenderInput(spec=validate_spec(document), profile=profile, policy=kw.pop("policy", POLICY), **kw)


def fresh(inp: RenderInput) -> Domain:
    return Domain(type=inp.profile.domain_type, name="", uuid="", os=OsBoot(arch=inp.profile.arch, machine=inp.profile.machine))


def run(configure: Callable[[RenderInput, Domain], None], spec: dict | None = None, profile: HostProfile = PC, **kw: Any) -> Domain:
    inp = make_input(spec, profile, **kw)
    dom = fresh(inp)
    configure(inp, dom)
    return dom


# --- identity and metadata -------------------------------------------------------------------


def test_identity_names_the_domain_by_instance_uuid() -> None:
    spec = {"name": "web <1>", "description": "d & e", "labels": {"a": "1"}, "userdata": "#cloud-config\n", "count": 3}
    dom = run(identity.configure, spec)
    assert (dom.name, dom.uuid, dom.title, dom.description) == (UUID, UUID, "web <1>", "d & e")
    meta = dom.metadata
    assert meta is not None
    assert meta.instance_uuid == UUID
    assert meta.labels == {"a": "1"}
    assert meta.userdata_digest == hashlib.sha256(b"#cloud-config\n").hexdigest()
    model = validate_spec({"uuid": UUID, **spec})
    assert meta.spec_hash == model.spec_hash()
    assert meta.spec == model.model_dump(mode="json", by_alias=True, exclude_none=True, exclude=STORED_SPEC_EXCLUDE | {"labels"})
    assert {"userdata", "labels", "count"}.isdisjoint(meta.spec)


def test_identity_without_uuid_derives_a_stable_one() -> None:
    inp = RenderInput(spec=validate_spec({"name": "web"}), profile=PC)
    dom = fresh(inp)
    identity.configure(inp, dom)
    assert dom.uuid == str(uuid_module.uuid5(SPEC_UUID_NAMESPACE, "web"))
    assert dom.metadata is not None and dom.metadata.userdata_digest is None
    assert validate_spec({"name": "other"}).instance_uuid != dom.uuid


@pytest.mark.parametrize(
    ("change", "same_hash"),
    [
        ({"labels": {"b": "2"}}, True),
        ({"name": "renamed"}, True),
        ({"description": "new text"}, True),
        ({"count": 9, "hostId": "1h2"}, True),
        ({"vcpu": 2}, False),
        ({"userdata": "#cloud-config\nx: 1\n"}, False),
    ],
)
def test_spec_hash_ignores_what_is_updated_in_place(change: dict, same_hash: bool) -> None:
    base = {"uuid": UUID, "name": "web", "labels": {"a": "1"}}
    assert (validate_spec(base).spec_hash() == validate_spec({**base, **change}).spec_hash()) is same_hash


# --- cpu -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "profile", "expected"),
    [
        ({}, PC, (1, None, None, None)),
        ({"vcpu": 4, "cpuSet": "2,0-1", "cpuShares": 512}, KVM, (4, "0-2", 512, "host-model")),
        ({"cpuSet": "3"}, KVM, (1, "3", None, "host-model")),
        ({"cpuSet": "0-63"}, PC, (1, "0-63", None, None)),  # host CPUs unknown: not checked
    ],
)
def test_cpu(spec: dict, profile: HostProfile, expected: tuple) -> None:
    dom = run(cpu.configure, spec, profile)
    assert (dom.vcpu, dom.cpuset, dom.cpu_shares, dom.cpu_mode) == expected


def test_cpu_set_beyond_the_host_is_refused() -> None:
    with pytest.raises(RenderError, match=r"^cpuSet: CPU 4 does not exist on this host \(it has CPUs 0-3\)"):
        run(cpu.configure, {"cpuSet": "0,4"}, KVM)


# --- memory --------------------------------------------------------------------------------

GIB = 1 << 30


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ({}, (524288, None, None)),
        ({"memoryMb": 1024, "memory": 2 * GIB}, (1048576, 2097152, None)),
        ({"memoryMb": 1024, "memory": 2 * GIB, "memorySwap": -1}, (1048576, 2097152, None)),
        ({"memoryMb": 1024, "memory": 2 * GIB, "memorySwap": 3 * GIB}, (1048576, 2097152, 3145728)),
        ({"memorySwap": -1}, (524288, None, None)),
    ],
)
def test_memory(spec: dict, expected: tuple) -> None:
    dom = run(memory.configure, spec)
    assert (dom.memory_kib, dom.hard_limit_kib, dom.swap_hard_limit_kib) == expected


# --- boot ----------------------------------------------------------------------------------

KERNEL_DIR = LAYOUT.kernel_dir(MANIFEST)


@pytest.mark.parametrize(
    ("spec", "profile", "kw", "expected"),
    [
        ({"imageUuid": IMG}, PC, {}, (None, None, None, 64)),
        ({}, KVM, {}, (None, None, None, None)),
        ({}, PC, {"policy": replace(POLICY, tcg_tb_cache_mib=None)}, (None, None, None, None)),
        (
            {"imageUuid": f"kernel:{MANIFEST}"},
            PC,
            {},
            (f"{KERNEL_DIR}/kernel", f"{KERNEL_DIR}/initrd", "console=ttyS0", 64),
        ),
        (
            # the checksum pins the manifest; the cache folder is the URL's
            {"imageUuid": f"kernel:{MANIFEST}#sha256={'0' * 64}", "command": ["console=ttyS0", "init=/bin/sh"]},
            PC,
            {},
            (f"{KERNEL_DIR}/kernel", f"{KERNEL_DIR}/initrd", "console=ttyS0 init=/bin/sh", 64),
        ),
        (
            {"imageUuid": f"kernel:{MANIFEST}"},
            KVM,
            {"kernel_boot": KernelBoot(kernel="/k/vmlinuz", initrd=None, cmdline="quiet")},
            ("/k/vmlinuz", None, "quiet", None),
        ),
        (
            {"imageUuid": f"kernel:{MANIFEST}", "command": ["panic=-1"]},
            PC,
            {"kernel_boot": KernelBoot(kernel="/k/vmlinuz", initrd="/k/initrd.img", cmdline="quiet")},
            ("/k/vmlinuz", "/k/initrd.img", "panic=-1", 64),
        ),
    ],
)
def test_boot(spec: dict, profile: HostProfile, kw: dict, expected: tuple) -> None:
    dom = run(boot.configure, spec, profile, **kw)
    assert (dom.os.kernel, dom.os.initrd, dom.os.cmdline, dom.tcg_tb_cache_mib) == expected
    assert (dom.type, dom.os.machine, dom.os.arch) == (profile.domain_type, profile.machine, "x86_64")
    assert dom.features == ["acpi", "apic"]


def test_boot_uses_the_profiles_emulator() -> None:
    dom = run(boot.configure, {}, replace(PC, emulator="/usr/bin/qemu-system-x86_64"))
    assert dom.emulator == "/usr/bin/qemu-system-x86_64"


# --- disks ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("index", "name"),
    [(0, "vda"), (1, "vdb"), (25, "vdz"), (26, "vdaa"), (27, "vdab"), (51, "vdaz"), (52, "vdba"), (701, "vdzz"), (702, "vdaaa")],
)
def test_device_names(index: int, name: str) -> None:
    assert disks.device_name("vd", index) == name


def _disks(spec: dict, **kw: Any) -> list[tuple]:
    dom = run(disks.configure, spec, **kw)
    return [(d.target_dev, d.bus, d.pool, d.volume, d.driver_type, d.boot_order, d.serial, d.iotune) for d in dom.disks]


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ({}, []),
        ({"imageUuid": f"kernel:{MANIFEST}"}, []),
        (
            {"imageUuid": IMG},
            [("vda", "virtio", "pool0", f"{UUID}-root.qcow2", "qcow2", 1, "root", {})],
        ),
        (
            # a disk named root that is not root: the implied one is called rootdisk
            {"imageUuid": IMG, "disks": [{"name": "root"}]},
            [
                ("vda", "virtio", "pool0", f"{UUID}-rootdisk.qcow2", "qcow2", 1, "rootdisk", {}),
                ("vdb", "virtio", "pool0", f"{UUID}-root.qcow2", "qcow2", None, "root", {}),
            ],
        ),
        (
            {
                "volumeDriver": "vms",
                "disks": [
                    {"name": "a", "readIops": 10, "writeIops": 0},
                    {"name": "b", "root": True, "opts": {"format": "raw"}},
                    {"name": "c", "driver": "fast", "writeIops": 20, "opts": {"bus": "scsi"}},
                    {"name": "d", "opts": {"bus": "sata"}},
                ],
            },
            [
                ("vda", "virtio", "vms", f"{UUID}-b.raw", "raw", 1, "b", {}),
                ("vdb", "virtio", "vms", f"{UUID}-a.qcow2", "qcow2", None, "a", {"read_iops_sec": 10}),
                ("sda", "scsi", "fast", f"{UUID}-c.qcow2", "qcow2", None, "c", {"write_iops_sec": 20}),
                ("sdb", "sata", "vms", f"{UUID}-d.qcow2", "qcow2", None, "d", {}),
            ],
        ),
    ],
)
def test_disks(spec: dict, expected: list) -> None:
    assert _disks(spec) == expected


def test_disks_scsi_controller_only_with_a_scsi_disk() -> None:
    assert run(disks.configure, {"disks": [{"name": "a", "opts": {"bus": "scsi"}}]}).scsi_controller
    assert not run(disks.configure, {"disks": [{"name": "a", "opts": {"bus": "sata"}}]}).scsi_controller


def test_disks_options_reach_the_driver() -> None:
    (disk,) = run(disks.configure, {"disks": [{"name": "a", "opts": {"cache": "writeback", "discard": "ignore"}}]}).disks
    assert (disk.cache, disk.discard, disk.device, disk.source_type, disk.readonly) == ("writeback", "ignore", "disk", "volume", False)


def test_sixteen_virtio_disks_use_vda_to_vdp() -> None:
    devs = [d[0] for d in _disks({"disks": [{"name": f"d{i}"} for i in range(16)]})]
    assert devs == [f"vd{c}" for c in "abcdefghijklmnop"]


# --- seed ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("profile", "spec", "target", "bus"),
    [
        (PC, {}, "hdc", "ide"),
        (PC, {"disks": [{"name": "a", "opts": {"bus": "sata"}}]}, "hdc", "ide"),
        (Q35, {}, "sda", "sata"),
        (Q35, {"imageUuid": IMG}, "sda", "sata"),  # the root disk is vda
        (Q35, {"disks": [{"name": "a", "opts": {"bus": "sata"}}, {"name": "b", "opts": {"bus": "scsi"}}]}, "sdc", "sata"),
        (replace(PC, machine="pc-i440fx-7.2"), {}, "hdc", "ide"),
    ],
)
def test_seed(profile: HostProfile, spec: dict, target: str, bus: str) -> None:
    inp = make_input(spec, profile)
    dom = fresh(inp)
    disks.configure(inp, dom)
    seed.configure(inp, dom)
    cdrom = dom.disks[-1]
    assert (cdrom.target_dev, cdrom.bus, cdrom.device, cdrom.source_type) == (target, bus, "cdrom", "file")
    assert (cdrom.file, cdrom.driver_type, cdrom.readonly) == (f"/srv/hm/state/seeds/{UUID}.iso", "raw", True)
    assert len({d.target_dev for d in dom.disks}) == len(dom.disks)


# --- network -------------------------------------------------------------------------------

DERIVED = derived_mac(UUID, 0)


@pytest.mark.parametrize(
    ("spec", "profile", "macs", "expected"),
    [
        ({}, PC, (), [("network", "net0", DERIVED)]),
        ({"networkMode": "bridge"}, PC, (), [("bridge", "br9", DERIVED)]),
        ({"networkMode": "none"}, PC, ("52:54:00:00:00:01",), []),
        ({"networkMode": "none"}, SESSION, (), []),
        (
            {"networkIds": ["1n1", "1n2"]},
            PC,
            ("52:54:00:AA:BB:01", "02:42:0a:00:00:02"),
            [("network", "net0", "52:54:00:aa:bb:01"), ("network", "net0", "02:42:0a:00:00:02")],
        ),
    ],
)
def test_network(spec: dict, profile: HostProfile, macs: tuple, expected: list) -> None:
    dom = run(network.configure, spec, profile, macs=macs)
    assert [(i.type, i.source, i.mac) for i in dom.interfaces] == expected
    assert all(i.model == "virtio" for i in dom.interfaces)
    assert dom.qemu_args == []


def test_derived_mac_is_stable_and_local() -> None:
    assert DERIVED == derived_mac(UUID, 0)
    assert DERIVED.startswith("52:54:00:")
    assert derived_mac(UUID, 1) != DERIVED
    assert derived_mac("2b4e28ba-2fa1-41d2-883f-0016d3cca427", 0) != DERIVED


@pytest.mark.parametrize("mac", ["52:54:00:00:00", "52-54-00-00-00-01", "01:00:5e:00:00:01", "52:54:00:00:00:01,id=x", ""])
def test_network_refuses_a_bad_controller_mac(mac: str) -> None:
    with pytest.raises(RenderError, match="^nics: "):
        run(network.configure, {}, SESSION, macs=(mac,))


@pytest.mark.parametrize(
    ("ports", "netdev"),
    [
        ([], "user,id=hostnet0"),
        (["80"], "user,id=hostnet0,hostfwd=tcp:127.0.0.1:80-:80"),
        (
            ["8080:80", "0.0.0.0:2222:22/tcp", "5353:53/udp", "127.0.0.2::443"],
            (
                "user,id=hostnet0,hostfwd=tcp:127.0.0.1:8080-:80,hostfwd=tcp:0.0.0.0:2222-:22,"
                "hostfwd=udp:127.0.0.1:5353-:53,hostfwd=tcp:127.0.0.2:443-:443"
            ),
        ),
    ],
)
def test_session_network_forwards_ports(ports: list, netdev: str) -> None:
    dom = run(network.configure, {"ports": ports, "networkMode": "bridge"}, SESSION, macs=("52:54:00:00:00:07",))
    assert dom.interfaces == []
    assert dom.qemu_args == ["-netdev", netdev, "-device", "virtio-net-pci,netdev=hostnet0,mac=52:54:00:00:00:07,addr=0x10"]


@pytest.mark.parametrize(("port", "why"), [("3868:3868/sctp", "only tcp and udp"), ("[::1]:8080:80", "only IPv4 host addresses")])
def test_session_network_refuses_what_hostfwd_cannot_do(port: str, why: str) -> None:
    with pytest.raises(RenderError, match=f"^ports: .*{why}"):
        run(network.configure, {"ports": [port]}, SESSION)


def test_ports_do_not_touch_a_system_domain() -> None:
    assert run(network.configure, {"ports": ["8080:80", "53/sctp"]}).qemu_args == []


# --- console, guest agent, graphics ----------------------------------------------------------


@pytest.mark.parametrize(
    ("log_config", "log_file"),
    [
        (None, f"/srv/hm/log/console/{UUID}.log"),
        ({"driver": "file"}, f"/srv/hm/log/console/{UUID}.log"),
        ({"driver": "json-file", "config": {}}, f"/srv/hm/log/console/{UUID}.log"),
        ({}, f"/srv/hm/log/console/{UUID}.log"),
        ({"driver": "none"}, None),
    ],
)
def test_serial_console(log_config: dict | None, log_file: str | None) -> None:
    dom = run(console.configure_serial, {"logConfig": log_config} if log_config is not None else {})
    assert dom.serial is not None and dom.serial.log_file == log_file


def test_guest_agent_channel() -> None:
    assert run(console.configure_guest_agent).guest_agent_channel


def test_graphics_password_is_stable_per_secret() -> None:
    dom = run(console.configure_graphics)
    assert dom.graphics is not None and dom.graphics.listen == "127.0.0.2"
    password = dom.graphics.password
    assert password is not None and len(password) == 8 and int(password, 16) >= 0
    assert run(console.configure_graphics).graphics.password == password  # type: ignore[union-attr]
    other = run(console.configure_graphics, policy=replace(POLICY, vnc_secret=b"other"))
    assert other.graphics.password != password  # type: ignore[union-attr]


# --- lifecycle, devices, security ------------------------------------------------------------


@pytest.mark.parametrize("policy", [None, {"name": "no"}, {"name": "always"}, {"name": "unless-stopped"},
                                    {"name": "on-failure", "maximumRetryCount": 3}])
def test_lifecycle_stops_the_domain_on_a_crash_whatever_the_policy(policy: dict | None) -> None:
    """The agent applies the policy (counted, with backoff); libvirt must not reset a panicked
    guest in place behind its back. The pvpanic device makes a panic a `crashed` stop."""
    dom = run(lifecycle.configure, {"restartPolicy": policy} if policy else {})
    assert (dom.on_poweroff, dom.on_reboot, dom.on_crash, dom.panic) == ("destroy", "restart", "destroy", True)


def test_entropy_device() -> None:
    assert run(lifecycle.configure_devices).rng


@pytest.mark.parametrize(
    ("opts", "none"), [([], False), (["label=dynamic"], False), (["label=disable"], True), (["label=dynamic", "label=disable"], True)]
)
def test_security(opts: list, none: bool) -> None:
    assert run(lifecycle.configure_security, {"securityOpt": opts}).seclabel_none is none


# --- the pipeline ----------------------------------------------------------------------------


def test_pipeline_order() -> None:
    order = list(builder.CONFIGURATORS)
    assert order.index(seed.configure) > max(order.index(boot.configure), order.index(disks.configure))
    assert order[0] is identity.configure


def test_render_error_is_a_value_error_for_callers() -> None:
    assert issubclass(RenderError, ValueError) and cpu.RenderError is RenderError


# --- metadata --------------------------------------------------------------------------------

NASTY = "<>&'\"]]> ünïcødé 😀 \x00\x01\x1b\x7f\u2028\ufffe"


def _meta(**kw: Any) -> AgentMetadata:
    base: dict[str, Any] = {
        "instance_uuid": UUID,
        "spec_hash": "ab" * 32,
        "spec": {"name": NASTY, "vcpu": 2, "disks": [{"name": "a"}]},
        "labels": {"io.example/x": NASTY, "empty": ""},
        "userdata_digest": "cd" * 32,
    }
    return AgentMetadata(**{**base, **kw})


@pytest.mark.parametrize("digest", ["cd" * 32, None])
def test_metadata_round_trip(digest: str | None) -> None:
    meta = _meta(userdata_digest=digest)
    element = metadata.metadata_element(meta)
    assert metadata.parse_metadata(element) == meta
    assert metadata.parse_metadata(metadata.metadata_xml(meta)) == meta
    domain = etree.Element("domain")
    etree.SubElement(domain, "metadata").append(element)
    text = etree.tostring(domain, encoding="unicode")
    assert metadata.parse_metadata(text) == meta
    assert metadata.parse_metadata(text.encode()) == meta


def test_metadata_as_libvirt_returns_it() -> None:
    """virDomain.metadata(ELEMENT, NAMESPACE) answers with the element stripped of its namespace."""
    plain = (
        f'<instance format="1">\n  <uuid>{UUID}</uuid>\n  <specHash>ff</specHash>\n'
        '  <labels>{"a":"\\u003c"}</labels>\n  <spec>{}</spec>\n</instance>'
    )
    meta = metadata.parse_metadata(plain)
    assert (meta.instance_uuid, meta.labels, meta.spec_hash, meta.userdata_digest) == (UUID, {"a": "<"}, "ff", None)


@pytest.mark.parametrize(
    "xml",
    [
        f"<domain type='qemu'><name>x</name><uuid>{UUID}</uuid></domain>",
        "<domain><metadata><app:instance xmlns:app='https://example.com/app'><app:uuid>x</app:uuid></app:instance></metadata></domain>",
        f"<domain><metadata><instance><uuid>{UUID}</uuid></instance></metadata></domain>",
        f"<domain><metadata><herdsman:instance xmlns:herdsman='{metadata.NAMESPACE}' format='1'/></metadata></domain>",
    ],
    ids=["no metadata", "another namespace", "unqualified inside a domain", "no uuid"],
)
def test_foreign_domain_is_not_ours(xml: str) -> None:
    with pytest.raises(metadata.NotOurs):
        metadata.parse_metadata(xml)


def test_newer_metadata_format_is_not_ours() -> None:
    meta = _meta(format_version=metadata.FORMAT_VERSION + 1)
    with pytest.raises(metadata.NotOurs, match="newer"):
        metadata.parse_metadata(metadata.metadata_xml(meta))


def test_metadata_does_not_expand_entities(tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text('{"leak": "yes"}')
    xml = (
        f'<!DOCTYPE domain [<!ENTITY x SYSTEM "file://{secret}">]>'
        f"<domain><metadata><herdsman:instance xmlns:herdsman='{metadata.NAMESPACE}' format='1'>"
        f"<herdsman:uuid>{UUID}</herdsman:uuid><herdsman:labels>&x;</herdsman:labels>"
        "</herdsman:instance></metadata></domain>"
    )
    try:
        meta = metadata.parse_metadata(xml)
    except ValueError:
        return
    assert meta.labels == {}
