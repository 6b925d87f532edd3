"""The migrateToURI3 call built from typed options and a domain's disks (pure)."""

from __future__ import annotations

from pathlib import Path

import libvirt
import pytest
from pydantic import ValidationError

from drivers.libvirt.migration.disks import copied_disks, domain_disks, required_files, unsupported
from drivers.libvirt.migration.options import Destination, MigrationOptions
from drivers.libvirt.migration.plan import BASE_FLAGS, build_call, describe_flags

GOLDEN = Path(__file__).parent / "golden"
DEST = Destination(libvirt_uri="qemu+tcp://10.77.1.2/system", migration_address="10.77.1.2")
URI, DISKS = libvirt.VIR_MIGRATE_PARAM_URI, libvirt.VIR_MIGRATE_PARAM_MIGRATE_DISKS


def domain(*disks: str, os: str = "") -> str:
    return f"<domain type='qemu'><name>x</name><os><type>hvm</type>{os}</os><devices>{''.join(disks)}</devices></domain>"


OVERLAY = ("<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
           "<source file='/var/lib/libvirt/images/g/root.qcow2'/><target dev='vda' bus='virtio'/></disk>")
SEED = ("<disk type='file' device='cdrom'><driver name='qemu' type='raw'/>"
        "<source file='/var/lib/herdsman/seeds/u.iso'/><target dev='hdc' bus='ide'/><readonly/></disk>")
SHARED = ("<disk type='file' device='disk'><source file='/srv/shared.img'/><target dev='vdb' bus='virtio'/>"
          "<shareable/></disk>")
NETWORK = ("<disk type='network' device='disk'><source protocol='rbd' name='pool/img'/>"
           "<target dev='vdc' bus='virtio'/></disk>")
EMPTY_CDROM = "<disk type='file' device='cdrom'><target dev='hdd' bus='ide'/><readonly/></disk>"
BLOCK = "<disk type='block' device='disk'><source dev='/dev/vg/lv'/><target dev='vde' bus='virtio'/></disk>"


def test_default_call_is_peer_to_peer_live_persistent_with_the_writable_disks_copied() -> None:
    call = build_call(MigrationOptions(), domain_disks(domain(OVERLAY, SEED, SHARED, NETWORK, EMPTY_CDROM)), DEST)
    assert call.dconnuri == "qemu+tcp://10.77.1.2/system"
    assert call.flags == (libvirt.VIR_MIGRATE_LIVE | libvirt.VIR_MIGRATE_PEER2PEER
                          | libvirt.VIR_MIGRATE_PERSIST_DEST | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE
                          | libvirt.VIR_MIGRATE_NON_SHARED_INC | libvirt.VIR_MIGRATE_AUTO_CONVERGE
                          | libvirt.VIR_MIGRATE_ABORT_ON_ERROR)
    # only the VM's own writable local disk: never the seed, a shared or a network disk
    assert call.params == {URI: "tcp://10.77.1.2", DISKS: ["vda"]}
    assert describe_flags(call.flags) == ("LIVE|PEER2PEER|PERSIST_DEST|UNDEFINE_SOURCE|NON_SHARED_INC|"
                                          "ABORT_ON_ERROR|AUTO_CONVERGE")


def test_no_writable_local_disk_means_no_incremental_copy_and_no_empty_disk_list() -> None:
    # libvirt reads an empty migrate_disks with INC as "copy every writable disk", shared ones too
    call = build_call(MigrationOptions(auto_converge=False, abort_on_error=False),
                      domain_disks(domain(SEED, SHARED, NETWORK)), DEST)
    assert call.flags == BASE_FLAGS
    assert call.params == {URI: "tcp://10.77.1.2"}
    assert call.migrate_disks == ()


def test_options_add_bandwidth_postcopy_tls_and_auto_converge_tuning() -> None:
    options = MigrationOptions(bandwidth=50, postcopy=True, postcopy_bandwidth=20, tls=True,
                               auto_converge_initial=30, auto_converge_increment=5)
    call = build_call(options, domain_disks(domain(OVERLAY)), DEST)
    assert call.postcopy and call.flags & libvirt.VIR_MIGRATE_TLS
    assert call.params[libvirt.VIR_MIGRATE_PARAM_BANDWIDTH] == 50
    assert call.params[libvirt.VIR_MIGRATE_PARAM_BANDWIDTH_POSTCOPY] == 20
    assert call.params[libvirt.VIR_MIGRATE_PARAM_AUTO_CONVERGE_INITIAL] == 30
    assert call.params[libvirt.VIR_MIGRATE_PARAM_AUTO_CONVERGE_INCREMENT] == 5
    assert not call.flags & (libvirt.VIR_MIGRATE_TUNNELLED | libvirt.VIR_MIGRATE_UNSAFE)


def test_migration_uri_is_always_explicit_ipv6_bracketed_with_port() -> None:
    dest = Destination(libvirt_uri="qemu+tls://b.example/system", migration_address="fd00::2",
                       migration_port=49152)
    assert dest.migrate_uri == "tcp://[fd00::2]:49152"
    assert Destination(libvirt_uri="qemu+tcp://b/system", migration_address="host-b.lan").migrate_uri == "tcp://host-b.lan"


@pytest.mark.parametrize(("fields", "field", "text"), [
    ({"libvirt_uri": "http://b/system"}, "libvirt_uri", "not a qemu libvirt URI"),
    ({"libvirt_uri": "qemu+tcp://b/"}, "libvirt_uri", "no qemu driver path"),
    ({"libvirt_uri": "qemu+tcp://b/system?x='1'"}, "libvirt_uri", "characters"),
    ({"migration_address": "10.0.0.2; rm -rf /"}, "migration_address", "neither an IP"),
    ({"migration_address": "-bad"}, "migration_address", "neither an IP"),
    ({"migration_port": 70000}, "migration_port", "less than or equal"),
])
def test_a_bad_destination_is_refused_naming_the_field(fields: dict[str, object], field: str, text: str) -> None:
    values = {"libvirt_uri": "qemu+tcp://b/system", "migration_address": "10.0.0.2", **fields}
    with pytest.raises(ValidationError) as err:
        Destination(**values)
    (error,) = err.value.errors()
    assert error["loc"] == (field,) and text in error["msg"]


@pytest.mark.parametrize(("fields", "field"), [
    ({"bandwidth": -1}, "bandwidth"), ({"progress_timeout": 0}, "progress_timeout"),
    ({"auto_converge_increment": 0}, "auto_converge_increment"), ({"speed": 1}, "speed"),
])
def test_bad_options_are_refused_naming_the_field(fields: dict[str, object], field: str) -> None:
    with pytest.raises(ValidationError) as err:
        MigrationOptions(**fields)
    assert err.value.errors()[0]["loc"] == (field,)


def test_completion_deadline_scales_with_what_moves_and_has_a_floor() -> None:
    options = MigrationOptions()
    assert options.completion_deadline(256 << 20) == 120.0  # the floor
    assert options.completion_deadline(4 << 30) == 600.0  # 150 s per GiB
    assert MigrationOptions(completion_per_gib=10, completion_min=1).completion_deadline(1 << 29) == 5.0


def test_an_agent_rendered_domain_copies_its_pool_volumes_and_needs_kernel_and_seed_there() -> None:
    xml = (GOLDEN / "03-kernel-command.xml").read_text()
    disks = domain_disks(xml)
    assert [(d.target, d.copied) for d in disks] == [("vda", True), ("hdc", False)]
    assert copied_disks(disks)[0].pool == "herdsman"
    assert required_files(xml) == [
        "/var/lib/herdsman/kernels/f9da87ded917b18cba007e21/kernel",
        "/var/lib/herdsman/kernels/f9da87ded917b18cba007e21/initrd",
        "/var/lib/herdsman/seeds/901de000-0000-4000-8000-000000000003.iso",
    ]
    assert unsupported(disks) == []
    q35 = domain_disks((GOLDEN / "07-q35-sata-scsi.xml").read_text())
    assert build_call(MigrationOptions(), q35, DEST).migrate_disks == ("sda", "sdb", "vda")


def test_block_devices_are_reported_as_unsupported() -> None:
    assert unsupported(domain_disks(domain(BLOCK))) == [
        "disk vde (/dev/vg/lv) is a block device: the destination cannot be prepared for it "
        "through a storage pool"]
