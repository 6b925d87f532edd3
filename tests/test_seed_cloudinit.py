"""Our seed documents read by cloud-init's own code: its user-data processor and part
merger, its YAML loader and its network-config parser.

cloud-init is not a PyPI package: tests/guest/cloudinit.py unpacks Debian's package (never
installed) and its code runs in this environment, which has the imports it needs (the test
extras). HERDSMAN_CLOUDINIT_PYTHON / HERDSMAN_CLOUDINIT_PATH point at another python and
cloud-init tree instead (e.g. a newer cloud-init).
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from pathlib import Path

from drivers.libvirt.seed import SeedInputs, render_seed_files
from tests.guest.cloudinit import ensure_cloudinit

UUID = "1b4e28ba-2fa1-11d2-883f-0016d3cca427"
HOSTS = (("db", "10.0.0.5"),)
EXTRA_PATHS = [
    "/etc/herdsman/extra-hosts",
    "/var/lib/cloud/scripts/per-boot/herdsman-extra-hosts",
]

# Runs inside the system python3 with cloud-init importable; prints one JSON document.
_READER = r"""
import base64, json, sys, tempfile
from cloudinit import handlers, helpers, util
from cloudinit import user_data as ud
from cloudinit.handlers.cloud_config import CloudConfigPartHandler
from cloudinit.net import network_state
from cloudinit.settings import PER_INSTANCE

kind, path = sys.argv[1], sys.argv[2]
blob = open(path, "rb").read()
if kind == "user-data":
    tmp = tempfile.mkdtemp()
    paths = helpers.Paths({"cloud_dir": tmp, "run_dir": tmp})
    msg = ud.UserDataProcessor(paths).process(blob)
    merger = CloudConfigPartHandler(paths)
    merger.handle_part(None, handlers.CONTENT_START, None, None, PER_INSTANCE, {})
    parts = []
    for part in msg.walk():
        if part.get_content_maintype() == "multipart":
            continue
        payload = util.fully_decoded_payload(part)
        raw = payload.encode("utf-8", "surrogateescape") if isinstance(payload, str) else payload
        parts.append([part.get_content_type(), base64.b64encode(raw).decode()])
        if part.get_content_type() in merger.list_types():
            merger.handle_part(None, part.get_content_type(), part.get_filename(), payload,
                               PER_INSTANCE, dict(part.items()))
    print(json.dumps({"parts": parts, "config": merger.cloud_buf}))
elif kind == "meta-data":
    print(json.dumps(util.load_yaml(blob.decode())))
else:
    state = network_state.parse_net_config_data(util.load_yaml(blob.decode()))
    print(json.dumps({
        "macs": [i.get("mac_address") for i in state.iter_interfaces()],
        "subnets": [s.get("type") for i in state.iter_interfaces() for s in i["subnets"]],
        "dns": state.dns_nameservers,
        "search": state.dns_searchdomains,
    }))
"""


def _python() -> tuple[str, dict[str, str]]:
    python = os.environ.get("HERDSMAN_CLOUDINIT_PYTHON") or sys.executable
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PYTHONPATH"] = os.environ.get("HERDSMAN_CLOUDINIT_PATH") or str(ensure_cloudinit())
    return python, env


def _read(kind: str, data: bytes, tmp_path: Path) -> dict:
    python, env = _python()
    path = tmp_path / kind
    path.write_bytes(data)
    out = subprocess.run([python, "-c", _READER, kind, str(path)], env=env, check=True,
                         capture_output=True, timeout=60)
    return json.loads(out.stdout)


def _parts(result: dict) -> list[tuple[str, bytes]]:
    return [(ctype, base64.b64decode(raw)) for ctype, raw in result["parts"]]


def test_cloud_init_appends_our_write_files_to_the_users_and_keeps_their_keys(tmp_path):
    user = "#cloud-config\nmanage_etc_hosts: true\nwrite_files:\n- path: /u\n  content: u\n"
    files = render_seed_files(SeedInputs(UUID, userdata=user, extra_hosts=HOSTS))
    config = _read("user-data", files["user-data"], tmp_path)["config"]
    assert [f["path"] for f in config["write_files"]] == ["/u", *EXTRA_PATHS]
    assert config["manage_etc_hosts"] is True


def test_cloud_init_gets_the_users_script_byte_exact(tmp_path):
    user = "#!/bin/sh\n# <>&'\"]]> ünïcødé 😀 \x01\x0c\r\necho hi\n"
    files = render_seed_files(SeedInputs(UUID, userdata=user, extra_hosts=HOSTS))
    result = _read("user-data", files["user-data"], tmp_path)
    parts = _parts(result)
    assert parts[0] == ("text/x-shellscript", user.encode())
    assert parts[1][0] == "text/cloud-config"
    assert [f["path"] for f in result["config"]["write_files"]] == EXTRA_PATHS


def test_cloud_init_still_sees_the_parts_of_users_own_mime(tmp_path):
    mime = MIMEMultipart()
    mime.attach(MIMEText("#cloud-config\nwrite_files: [{path: /m, content: m}]\n",
                         "cloud-config"))
    mime.attach(MIMEText("#!/bin/sh\necho from-mime\n", "x-shellscript"))
    files = render_seed_files(SeedInputs(UUID, userdata=mime.as_string(), extra_hosts=HOSTS))
    result = _read("user-data", files["user-data"], tmp_path)
    assert [c for c, _ in _parts(result)] == [
        "text/cloud-config", "text/x-shellscript", "text/cloud-config",
    ]
    assert [f["path"] for f in result["config"]["write_files"]] == ["/m", *EXTRA_PATHS]


def test_cloud_init_reads_meta_data_and_network_config(tmp_path):
    inputs = SeedInputs(UUID, hostname="web", domain_name="example.com",
                        dns=("192.0.2.53",), dns_search=("example.com",),
                        macs=("52:54:00:AA:BB:CC", "52:54:00:00:00:01"))
    files = render_seed_files(inputs)
    meta = _read("meta-data", files["meta-data"], tmp_path)
    assert meta == {"instance-id": UUID, "local-hostname": "web.example.com"}
    net = _read("network-config", files["network-config"], tmp_path)
    assert net["macs"] == ["52:54:00:aa:bb:cc", "52:54:00:00:00:01"]
    assert net["subnets"] == ["dhcp4", "dhcp4"]
    assert set(net["dns"]) == {"192.0.2.53"} and set(net["search"]) == {"example.com"}
