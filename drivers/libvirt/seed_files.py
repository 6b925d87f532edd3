"""The documents of a cloud-init NoCloud seed: `meta-data`, `network-config` and `user-data`.

Pure functions from :class:`SeedInputs` to bytes; the ISO around them lives in ``seed.py``.

Encoding rules, because every value here ends up parsed by YAML inside the guest:

* meta-data and network-config are YAML whose every scalar is written by ``json.dumps``
  (JSON is valid YAML). Values must be printable ASCII (host names, IPs, MACs and uuids
  are), so the JSON escapes are also valid YAML escapes; anything else is rejected rather
  than emitted.
* the user's user-data is never parsed or re-encoded: it is written as is, or carried in a
  base64 MIME part, so every byte reaches the guest.

user-data is always written, empty when there is nothing: NoCloud reads `user-data` and
`meta-data` as required files and ignores a seed missing either (an empty user-data simply
configures nothing). An empty userdata string counts as none.

Extra /etc/hosts entries: `write_files` or `bootcmd` edits of /etc/hosts do not last, since
both run in the init stage *before* update_etc_hosts, which with `manage_etc_hosts: true`
re-renders /etc/hosts from its template on every boot. So the seed's cloud-config writes a
data file plus a script in /var/lib/cloud/scripts/per-boot/, which cloud-init runs in the
final stage of every boot (after update_etc_hosts, before the user's scripts and runcmd);
the script keeps the entries in one marked block of /etc/hosts. When the user has
user-data too, both go in one multipart/mixed document and our part carries a Merge-Type
that appends to the user's lists instead of replacing them. Like any `write_files`, the data
file is written once per instance-id: a later change reaches a VM whose instance-id stays
the same only if something else rewrites it.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import json
import re
from dataclasses import dataclass

USER_DATA = "user-data"
META_DATA = "meta-data"
NETWORK_CONFIG = "network-config"

#: Where the extra /etc/hosts entries and the script that applies them land in the guest.
EXTRA_HOSTS_DATA = "/etc/herdsman/extra-hosts"
EXTRA_HOSTS_SCRIPT = "/var/lib/cloud/scripts/per-boot/herdsman-extra-hosts"

#: Merge rule for the cloud-config part added next to the user's: append to the user's
#: lists (``write_files``) and never replace a key the user set. cloud-init's default
#: (``dict(replace)+list()+str()``) would make a later part's ``write_files`` drop the user's.
MERGE_TYPE = "list(append)+dict(no_replace,recurse_list)+str()"

# First-line markers cloud-init itself uses to type a part (handlers.INCLUSION_TYPES_MAP),
# tried longest first so `#cloud-config-archive` is not taken for `#cloud-config`.
_PART_TYPES = {
    "#include-once": "text/x-include-once-url",
    "#include": "text/x-include-url",
    "#!": "text/x-shellscript",
    "#cloud-config-archive": "text/cloud-config-archive",
    "#cloud-config-jsonp": "text/cloud-config-jsonp",
    "#cloud-config": "text/cloud-config",
    "#cloud-boothook": "text/cloud-boothook",
    "#part-handler": "text/part-handler",
    "## template: jinja": "text/jinja2",
}
_PREFIXES = sorted(_PART_TYPES, key=len, reverse=True)

_MAC = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")  # used with fullmatch: no "\n" slips by
_TOKEN = re.compile(r"[\x21-\x7e]{1,253}")  # printable ASCII, no space

# Applies the extra hosts every boot, after cloud-init's update_etc_hosts (init stage) may
# have regenerated /etc/hosts (`manage_etc_hosts: true`, which some images enable). It owns
# one marked block, so re-runs replace it instead of adding lines, and it rewrites the file
# in place (no rename) to keep /etc/hosts' inode, owner and SELinux label. Arguments exist
# for tests; cloud-init runs it with none. Constant text: no user value is ever in it.
HOSTS_SCRIPT = """\
#!/bin/sh
# Keeps this VM's extra /etc/hosts entries (written by herdsman's seed) in one marked block.
set -eu
src="${1:-/etc/herdsman/extra-hosts}"
hosts="${2:-/etc/hosts}"
begin='# BEGIN herdsman extra-hosts'
end='# END herdsman extra-hosts'
[ -r "$src" ] || exit 0
tmp="$(mktemp)"
trap 'rm -f "$tmp"' EXIT
{
  if [ -e "$hosts" ]; then
    sed "/^$begin\\$/,/^$end\\$/d" "$hosts"
    # a last line without its newline would swallow the marker
    if [ -n "$(tail -c 1 "$hosts")" ]; then echo; fi
  fi
  printf '%s\\n' "$begin"
  cat "$src"
  printf '%s\\n' "$end"
} >"$tmp"
cat "$tmp" >"$hosts"
"""


@dataclass(frozen=True)
class SeedInputs:
    """Everything a VM's seed depends on; equal inputs give byte-equal documents."""

    instance_id: str
    hostname: str | None = None
    domain_name: str | None = None
    userdata: str | None = None
    dns: tuple[str, ...] = ()
    dns_search: tuple[str, ...] = ()
    extra_hosts: tuple[tuple[str, str], ...] = ()
    macs: tuple[str, ...] = ()


def render_seed_files(inputs: SeedInputs) -> dict[str, bytes]:
    """The seed's files by name; `network-config` only when the VM has NICs.

    `user-data` is always present, empty when there is nothing to say: NoCloud requires
    both `user-data` and `meta-data` to exist or it ignores the whole seed.
    """
    files = {
        META_DATA: render_meta_data(inputs),
        USER_DATA: render_user_data(inputs),
    }
    network = render_network_config(inputs)
    if network is not None:
        files[NETWORK_CONFIG] = network
    return files


def render_meta_data(inputs: SeedInputs) -> bytes:
    lines = [f"instance-id: {_scalar('instance_id', inputs.instance_id)}"]
    if inputs.hostname:
        fqdn = inputs.hostname
        if inputs.domain_name:
            fqdn = f"{inputs.hostname}.{inputs.domain_name}"
        lines.append(f"local-hostname: {_scalar('hostname', fqdn)}")
    return ("\n".join(lines) + "\n").encode("ascii")


def render_network_config(inputs: SeedInputs) -> bytes | None:
    """Netplan-style version 2: DHCP on every NIC, matched by MAC so names do not matter."""
    if not inputs.macs:
        return None
    macs = [_mac(m) for m in inputs.macs]
    if len(set(macs)) != len(macs):
        raise ValueError("seed: duplicate MAC address")
    dns = [_ip("dns", a) for a in inputs.dns]
    search = [_token("dns_search", d) for d in inputs.dns_search]
    lines = ["version: 2", "ethernets:"]
    for index, mac in enumerate(macs):
        lines += [
            f"  nic{index}:",
            "    match:",
            f"      macaddress: {json.dumps(mac)}",
            "    dhcp4: true",
        ]
        if dns or search:
            lines.append("    nameservers:")
            if dns:
                lines.append(f"      addresses: {json.dumps(dns)}")
            if search:
                lines.append(f"      search: {json.dumps(search)}")
    return ("\n".join(lines) + "\n").encode("ascii")


def render_user_data(inputs: SeedInputs) -> bytes:
    """The user's user-data, alone or with the extra-hosts cloud-config in one MIME document."""
    user = _user_bytes(inputs.userdata)
    if not inputs.extra_hosts:
        return user
    hosts_config = render_hosts_cloud_config(inputs.extra_hosts)
    if not user:
        return hosts_config
    return _multipart(user, hosts_config)


def render_hosts_cloud_config(extra_hosts: tuple[tuple[str, str], ...]) -> bytes:
    """A cloud-config that installs the hosts list and the per-boot script applying it."""
    entries: list[str] = []
    for host, ip in extra_hosts:
        line = f"{_ip('extra_hosts ip', ip)}\t{_hostname(host)}\n"
        if line not in entries:
            entries.append(line)
    files = [
        (EXTRA_HOSTS_DATA, "0644", "".join(entries)),
        (EXTRA_HOSTS_SCRIPT, "0755", HOSTS_SCRIPT),
    ]
    lines = ["#cloud-config", "write_files:"]
    for path, mode, content in files:
        lines += [
            f"- path: {json.dumps(path)}",
            f"  permissions: {json.dumps(mode)}",
            f"  content: {json.dumps(content, ensure_ascii=True)}",
        ]
    return ("\n".join(lines) + "\n").encode("ascii")


def part_content_type(user: bytes) -> str:
    """The MIME type cloud-init would give this user-data, from its first characters."""
    head = user[:4096].decode("utf-8", "replace").lstrip().lower()
    for prefix in _PREFIXES:
        if head.startswith(prefix):
            return _PART_TYPES[prefix]
    return "text/plain"


def is_mime(user: bytes) -> bool:
    """cloud-init's own test (user_data.convert_string): such user-data is already MIME."""
    return b"mime-version:" in user[:4096].lower()


def _multipart(user: bytes, hosts_config: bytes) -> bytes:
    """multipart/mixed: the user's part first, then ours with an appending Merge-Type.

    Hand-built so it is deterministic (a stable boundary, no generator rewrites). User
    MIME is nested verbatim (its headers become the part's headers), because wrapping it
    in base64 would hide its parts from cloud-init; anything else goes in base64.
    """
    if is_mime(user):
        user_part = user
    else:
        encoded = base64.encodebytes(user)
        user_part = (
            f'Content-Type: {part_content_type(user)}; charset="utf-8"\n'
            "MIME-Version: 1.0\n"
            "Content-Transfer-Encoding: base64\n\n"
        ).encode("ascii") + encoded.rstrip(b"\n")
    ours = (
        'Content-Type: text/cloud-config; charset="us-ascii"\n'
        "MIME-Version: 1.0\n"
        "Content-Transfer-Encoding: 7bit\n"
        f"Merge-Type: {MERGE_TYPE}\n\n"
    ).encode("ascii") + hosts_config
    boundary = _boundary(user_part, ours)
    sep = b"\n--" + boundary + b"\n"
    return (
        b'Content-Type: multipart/mixed; boundary="' + boundary + b'"\n'
        b"MIME-Version: 1.0\n"
        b"\n--" + boundary + b"\n" + user_part + sep + ours + b"\n--" + boundary + b"--\n"
    )


def _boundary(*parts: bytes) -> bytes:
    """A boundary derived from the content (stable) that occurs in none of the parts."""
    digest = hashlib.sha256(b"".join(parts))
    while True:
        candidate = b"herdsman-seed-" + digest.hexdigest()[:32].encode("ascii")
        if not any(candidate in p for p in parts):
            return candidate
        digest.update(b"\0")


def _user_bytes(userdata: str | None) -> bytes:
    if not userdata:
        return b""
    try:
        return userdata.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"seed: userdata is not valid Unicode text ({exc.reason})") from exc


def _token(field: str, value: str) -> str:
    if not isinstance(value, str) or not _TOKEN.fullmatch(value):
        raise ValueError(f"seed: {field} {value!r} must be 1-253 printable ASCII characters")
    return value


def _scalar(field: str, value: str) -> str:
    return json.dumps(_token(field, value))


def _hostname(value: str) -> str:
    if "#" in _token("extra_hosts name", value):
        raise ValueError(f"seed: extra_hosts name {value!r} contains '#'")
    return value


def _ip(field: str, value: str) -> str:
    try:
        return str(ipaddress.ip_address(_token(field, value)))
    except ValueError:
        raise ValueError(f"seed: {field} {value!r} is not an IP address") from None


def _mac(value: str) -> str:
    mac = _token("mac", value).lower()
    if not _MAC.fullmatch(mac):
        raise ValueError(f"seed: {value!r} is not a MAC address")
    return mac
