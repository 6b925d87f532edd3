"""The cloud-init NoCloud seed: its documents, the ISO as the system sees it, and write_seed."""

from __future__ import annotations

import email
import email.policy
import hashlib
import io
import os
import shutil
import stat
import subprocess
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from pathlib import Path

import pycdlib
import pytest

from drivers.libvirt.seed import (
    SeedInputs,
    build_seed_iso,
    recorded_digest,
    render_seed_files,
    seed_digest,
    write_seed,
)
from drivers.libvirt.seed_files import HOSTS_SCRIPT, MERGE_TYPE

yaml = pytest.importorskip("yaml")

UUID = "1b4e28ba-2fa1-11d2-883f-0016d3cca427"
# Everything that breaks naive XML/YAML/shell/MIME handling, plus unicode and controls.
NASTY = (
    "#!/bin/sh\n# <>&'\"]]> ${x} `id` $(id) --boundary\r\n"
    "ünïcødé ✓ 😀 \u2028\u0085 \x00\x01\x0b\x0c\x1b[31m\x7f\n"
    "Content-Type: text/plain\n\n--==x==--\n"
)
FULL = SeedInputs(
    instance_id=UUID,
    hostname="web",
    domain_name="example.com",
    userdata=NASTY,
    dns=("192.0.2.53", "2001:db8::53"),
    dns_search=("example.com", "corp.example"),
    extra_hosts=(("db", "10.0.0.5"), ("cache.internal", "2001:db8::7")),
    macs=("52:54:00:AA:BB:CC", "52:54:00:00:00:01"),
)


def _yaml(data: bytes) -> object:
    return yaml.safe_load(data.decode("utf-8"))


def _parts(user_data: bytes) -> list[email.message.Message]:
    msg = email.message_from_bytes(user_data, policy=email.policy.compat32)
    assert msg.get_content_type() == "multipart/mixed"
    assert msg["MIME-Version"] == "1.0"  # cloud-init only treats it as MIME with this header
    return [p for p in msg.walk() if not p.is_multipart()]


# --- meta-data -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("hostname", "domain", "expected"),
    [
        ("web", "example.com", "web.example.com"),
        ("web", None, "web"),
        (None, "example.com", None),
        (None, None, None),
    ],
)
def test_meta_data_holds_instance_id_and_local_hostname(hostname, domain, expected):
    inputs = SeedInputs(instance_id=UUID, hostname=hostname, domain_name=domain)
    meta = _yaml(render_seed_files(inputs)["meta-data"])
    assert meta["instance-id"] == UUID
    assert meta.get("local-hostname") == expected
    if expected is None:
        assert "local-hostname" not in meta


def test_same_inputs_give_the_same_files_and_digest():
    assert render_seed_files(FULL) == render_seed_files(FULL)
    assert seed_digest(FULL) == seed_digest(FULL)
    assert len(seed_digest(FULL)) == 64


@pytest.mark.parametrize(
    "change",
    [
        {"instance_id": "other"},
        {"hostname": "web2"},
        {"domain_name": "example.org"},
        {"userdata": NASTY + " "},
        {"dns": ("192.0.2.54",)},
        {"dns_search": ()},
        {"extra_hosts": (("db", "10.0.0.6"),)},
        {"macs": ("52:54:00:aa:bb:cc",)},
    ],
)
def test_any_input_change_changes_the_digest(change):
    changed = SeedInputs(**{**FULL.__dict__, **change})
    assert seed_digest(changed) != seed_digest(FULL)


def test_values_reach_yaml_exactly_even_with_yaml_syntax_in_them():
    # Printable, no whitespace: allowed through, and must come out as the same string.
    odd = "a\"b'c:d{e}[f]&g*h!i|j>k%l@m`n"
    inputs = SeedInputs(instance_id=odd, hostname="h", domain_name=odd)
    meta = _yaml(render_seed_files(inputs)["meta-data"])
    assert meta == {"instance-id": odd, "local-hostname": "h." + odd}


@pytest.mark.parametrize(
    "bad",
    [
        {"instance_id": "x\ninstance-id: evil"},
        {"instance_id": ""},
        {"hostname": "web\nlocal-hostname: evil"},
        {"hostname": "wéb"},
        {"hostname": "web\n"},
        {"macs": ("52:54:00:00:00:01\n",)},
        {"hostname": "web", "domain_name": "a b"},
        {"dns": ("192.0.2.1\n",), "macs": ("52:54:00:00:00:01",)},
        {"dns": ("not-an-ip",), "macs": ("52:54:00:00:00:01",)},
        {"dns_search": ("a\tb",), "macs": ("52:54:00:00:00:01",)},
        {"macs": ("52:54:00:00:00",)},
        {"macs": ("52:54:00:00:00:01", "52:54:00:00:00:01")},
        {"extra_hosts": (("db\n10.6.6.6 evil", "10.0.0.5"),)},
        {"extra_hosts": (("db#x", "10.0.0.5"),)},
        {"extra_hosts": (("db", "10.0.0.5 evil"),)},
        {"userdata": "lone surrogate \ud800"},
    ],
)
def test_values_that_could_break_out_of_their_field_are_rejected(bad):
    with pytest.raises(ValueError, match="seed"):
        render_seed_files(SeedInputs(**{"instance_id": UUID, **bad}))


# --- network-config --------------------------------------------------------------------


def test_network_config_matches_each_nic_by_mac_with_dhcp_and_dns():
    net = _yaml(render_seed_files(FULL)["network-config"])
    assert net["version"] == 2
    ethernets = list(net["ethernets"].values())
    assert [e["match"]["macaddress"] for e in ethernets] == [
        "52:54:00:aa:bb:cc",
        "52:54:00:00:00:01",
    ]
    for eth in ethernets:
        assert eth["dhcp4"] is True
        assert eth["nameservers"] == {
            "addresses": ["192.0.2.53", "2001:db8::53"],
            "search": ["example.com", "corp.example"],
        }


def test_network_config_without_dns_has_no_nameservers():
    net = _yaml(render_seed_files(SeedInputs(UUID, macs=("52:54:00:00:00:01",)))["network-config"])
    assert net == {
        "version": 2,
        "ethernets": {"nic0": {"match": {"macaddress": "52:54:00:00:00:01"}, "dhcp4": True}},
    }


def test_no_nics_means_no_network_config_file():
    files = render_seed_files(SeedInputs(UUID, dns=("192.0.2.53",)))
    assert set(files) == {"user-data", "meta-data"}


# --- user-data -------------------------------------------------------------------------


def test_user_data_is_the_users_text_byte_exact_when_nothing_is_added():
    files = render_seed_files(SeedInputs(UUID, userdata=NASTY, dns=("192.0.2.53",)))
    assert files["user-data"] == NASTY.encode("utf-8")


def test_user_data_file_exists_and_is_empty_when_there_is_nothing():
    # NoCloud requires user-data and meta-data to both exist, or it ignores the seed.
    assert render_seed_files(SeedInputs(UUID))["user-data"] == b""


def test_extra_hosts_without_userdata_is_a_plain_cloud_config():
    user_data = render_seed_files(SeedInputs(UUID, extra_hosts=FULL.extra_hosts))["user-data"]
    assert user_data.startswith(b"#cloud-config\n")
    config = _yaml(user_data)
    by_path = {f["path"]: f for f in config["write_files"]}
    data = by_path["/etc/herdsman/extra-hosts"]
    assert data["content"] == "10.0.0.5\tdb\n2001:db8::7\tcache.internal\n"
    script = by_path["/var/lib/cloud/scripts/per-boot/herdsman-extra-hosts"]
    assert script["content"] == HOSTS_SCRIPT
    assert script["permissions"] == "0755"


def test_extra_hosts_with_userdata_is_multipart_keeping_the_users_bytes():
    user_data = render_seed_files(FULL)["user-data"]
    user, ours = _parts(user_data)
    assert user.get_content_type() == "text/x-shellscript"
    assert user["Content-Transfer-Encoding"] == "base64"
    assert user.get_payload(decode=True) == NASTY.encode("utf-8")
    assert ours.get_content_type() == "text/cloud-config"
    assert ours["Merge-Type"] == MERGE_TYPE
    config = _yaml(ours.get_payload(decode=True))
    assert "10.0.0.5\tdb\n" in config["write_files"][0]["content"]


@pytest.mark.parametrize(
    ("first_line", "ctype"),
    [
        ("#!/bin/bash", "text/x-shellscript"),
        ("#cloud-config", "text/cloud-config"),
        ("#cloud-config-archive", "text/cloud-config-archive"),
        ("#include", "text/x-include-url"),
        ("#include-once", "text/x-include-once-url"),
        ("#cloud-boothook", "text/cloud-boothook"),
        ("## template: jinja", "text/jinja2"),
        ("  #Cloud-Config", "text/cloud-config"),  # cloud-init lowercases and strips too
        ("hello", "text/plain"),
    ],
)
def test_users_part_type_comes_from_its_first_line(first_line, ctype):
    text = first_line + "\nbody: 1\n"
    inputs = SeedInputs(UUID, userdata=text, extra_hosts=(("db", "10.0.0.5"),))
    user, _ = _parts(render_seed_files(inputs)["user-data"])
    assert user.get_content_type() == ctype
    assert user.get_payload(decode=True) == text.encode()


def test_users_own_mime_user_data_is_nested_verbatim_so_its_parts_still_run():
    mime = MIMEMultipart()
    mime.attach(MIMEText("#cloud-config\nruncmd: [[touch, /a]]\n", "cloud-config"))
    mime.attach(MIMEText("#!/bin/sh\necho from-mime\n", "x-shellscript"))
    text = mime.as_string()
    inputs = SeedInputs(UUID, userdata=text, extra_hosts=(("db", "10.0.0.5"),))
    user_data = render_seed_files(inputs)["user-data"]
    assert text.encode() in user_data
    parts = _parts(user_data)
    assert [p.get_content_type() for p in parts] == [
        "text/cloud-config",
        "text/x-shellscript",
        "text/cloud-config",
    ]
    assert parts[1].get_payload(decode=True) == b"#!/bin/sh\necho from-mime\n"
    assert parts[2]["Merge-Type"] == MERGE_TYPE


# --- the per-boot script that applies the extra hosts ----------------------------------


def test_hosts_script_keeps_one_block_across_reruns_and_regeneration(tmp_path):
    script = tmp_path / "apply"
    script.write_text(HOSTS_SCRIPT)
    data = tmp_path / "extra-hosts"
    data.write_text("10.0.0.5\tdb\n")
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost")  # no final newline
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = {**os.environ, "TMPDIR": str(scratch)}

    def run() -> str:
        subprocess.run(["sh", str(script), str(data), str(hosts)], check=True, timeout=10,
                       env=env)
        return hosts.read_text()

    block = "# BEGIN herdsman extra-hosts\n10.0.0.5\tdb\n# END herdsman extra-hosts\n"
    assert run() == "127.0.0.1 localhost\n" + block
    assert run() == "127.0.0.1 localhost\n" + block  # idempotent
    hosts.write_text("127.0.0.1 localhost\n::1 localhost\n")  # manage_etc_hosts rewrote it
    assert run() == "127.0.0.1 localhost\n::1 localhost\n" + block
    data.write_text("10.0.0.6\tdb\n")  # a new seed changed the entry
    assert run() == "127.0.0.1 localhost\n::1 localhost\n" + block.replace("10.0.0.5", "10.0.0.6")
    assert list(scratch.iterdir()) == []  # its temp file is gone


# --- the ISO ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def seed_iso(tmp_path_factory) -> tuple[Path, dict[str, bytes]]:
    files = render_seed_files(FULL)
    path = tmp_path_factory.mktemp("iso") / "seed.iso"
    path.write_bytes(build_seed_iso(files))
    return path, files


def test_iso_reads_back_through_pycdlib_by_every_name(seed_iso):
    path, files = seed_iso
    iso = pycdlib.PyCdlib()
    iso.open(str(path))
    try:
        assert iso.pvd.volume_identifier.rstrip() == b"cidata"
        iso_names = {"user-data": "/USERDATA.;1", "meta-data": "/METADATA.;1",
                     "network-config": "/NETWORKC.;1"}
        for name, data in files.items():
            for kwargs in ({"rr_path": "/" + name}, {"joliet_path": "/" + name},
                           {"iso_path": iso_names[name]}):
                out = io.BytesIO()
                iso.get_file_from_iso_fp(out, **kwargs)
                assert out.getvalue() == data, (name, kwargs)
    finally:
        iso.close()


@pytest.mark.parametrize("name", ["../x", "user-data\n", "UPPER", "a/b", ""])
def test_iso_refuses_file_names_that_are_not_plain(name):
    with pytest.raises(ValueError, match="seed"):
        build_seed_iso({name: b"x"})


def test_write_seed_does_not_follow_a_symlink_at_its_path(tmp_path):
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep me")
    path = tmp_path / "seed.iso"
    path.symlink_to(victim)
    assert write_seed(path, FULL) is True
    assert victim.read_bytes() == b"keep me"
    assert not path.is_symlink() and recorded_digest(path) == seed_digest(FULL)


def _isoinfo(*args: str) -> str:
    if not shutil.which("isoinfo"):
        pytest.skip("isoinfo (genisoimage) is not installed")
    return subprocess.run(["isoinfo", *args], check=True, capture_output=True,
                          timeout=30).stdout.decode("utf-8", "replace")


def test_isoinfo_sees_cidata_with_rock_ridge_and_joliet(seed_iso):
    path, files = seed_iso
    info = _isoinfo("-d", "-i", str(path))
    assert "Volume id: cidata" in info
    assert "Joliet with UCS level 3 found" in info
    assert "Rock Ridge signatures version 1 found" in info
    for flag in ("-R", "-J"):
        listing = _isoinfo(flag, "-l", "-i", str(path))
        names = {line.split()[-1] for line in listing.splitlines() if line.startswith("-")}
        assert names == set(files), flag
    for name, data in files.items():  # the system's reader, byte for byte
        out = subprocess.run(["isoinfo", "-R", "-i", str(path), "-x", "/" + name],
                             check=True, capture_output=True, timeout=30).stdout
        assert out == data, name


def test_blkid_sees_label_cidata_type_iso9660(seed_iso):
    path, _ = seed_iso
    if not shutil.which("blkid"):
        pytest.skip("blkid is not installed")
    out = subprocess.run(["blkid", "-o", "export", str(path)], check=True, capture_output=True,
                         text=True, timeout=30).stdout
    assert "LABEL=cidata" in out.splitlines()
    assert "TYPE=iso9660" in out.splitlines()


# The kernel's own iso9660 reader is tested in the guest: tests/test_seed_guest.py mounts the
# seed in the test guest and reads every file byte for byte (this host kernel has no iso9660).


# --- write_seed ------------------------------------------------------------------------


def _dir_listing(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_write_seed_builds_once_then_only_when_inputs_change(tmp_path):
    path = tmp_path / "seeds" / f"{UUID}.iso"
    old_umask = os.umask(0o022)
    try:
        assert write_seed(path, FULL) is True
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert recorded_digest(path) == seed_digest(FULL)
    first = path.stat()

    assert write_seed(path, FULL) is False
    again = path.stat()
    assert (again.st_ino, again.st_mtime_ns) == (first.st_ino, first.st_mtime_ns)

    changed = SeedInputs(**{**FULL.__dict__, "hostname": "web2"})
    assert write_seed(path, changed) is True
    assert recorded_digest(path) == seed_digest(changed)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert _dir_listing(path.parent) == [path.name]


def test_write_seed_restores_the_mode_of_an_unchanged_seed(tmp_path):
    path = tmp_path / "seed.iso"
    write_seed(path, FULL)
    path.chmod(0o644)
    assert write_seed(path, FULL) is False
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_write_seed_replaces_a_file_that_is_not_a_seed(tmp_path):
    path = tmp_path / "seed.iso"
    path.write_bytes(b"not an iso" * 5000)
    assert write_seed(path, FULL) is True
    assert recorded_digest(path) == seed_digest(FULL)


def test_interrupted_write_leaves_the_old_seed_and_no_temp_file(tmp_path):
    path = tmp_path / "seed.iso"
    write_seed(path, FULL)
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    seen: list[Path] = []

    def crash(tmp: Path) -> None:
        seen.append(tmp)
        assert tmp.parent == path.parent and tmp.stat().st_size > 0
        raise KeyboardInterrupt  # not an Exception: cleanup must still run

    changed = SeedInputs(**{**FULL.__dict__, "userdata": "#!/bin/sh\necho new\n"})
    with pytest.raises(KeyboardInterrupt):
        write_seed(path, changed, before_replace=crash)
    assert seen and not seen[0].exists()
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before
    assert recorded_digest(path) == seed_digest(FULL)
    assert _dir_listing(tmp_path) == ["seed.iso"]
    assert write_seed(path, changed) is True  # and the next attempt goes through


def test_write_into_an_unwritable_directory_fails_cleanly(tmp_path):
    # A read-only bind mount stops root too (a chmod'ed directory would not).
    path = tmp_path / "ro" / "seed.iso"
    path.parent.mkdir()
    write_seed(path, FULL)
    before = path.read_bytes()
    if os.geteuid() == 0:
        try:
            subprocess.run(["mount", "--bind", "-o", "ro", str(path.parent), str(path.parent)],
                           check=True, capture_output=True, timeout=30)
        except (subprocess.CalledProcessError, FileNotFoundError):
            pytest.skip("cannot make a read-only bind mount here")
        cleanup = ["umount", str(path.parent)]
    else:
        path.parent.chmod(0o555)
        cleanup = ["chmod", "755", str(path.parent)]
    try:
        changed = SeedInputs(**{**FULL.__dict__, "hostname": "web2"})
        with pytest.raises(OSError):
            write_seed(path, changed)
        assert path.read_bytes() == before
        assert _dir_listing(path.parent) == ["seed.iso"]
    finally:
        subprocess.run(cleanup, check=True, timeout=30)
