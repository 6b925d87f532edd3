"""Invalid specs are refused with the field's path and a message a user can act on.

Also: the action inputs' defaults (from the resource's API page) and the `herdsman validate` /
`herdsman render` commands as a user runs them.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from lxml import etree
from pydantic import ValidationError

from agent.spec.actions import (
    ContainerExec,
    ContainerLogs,
    ContainerProxy,
    InstanceConsoleInput,
    InstanceStop,
    SetLabelsInput,
)
from agent.spec.cattle import spec_from_document
from agent.spec.errors import SpecError

REPO = Path(__file__).resolve().parent.parent
IMG = "file:///var/lib/images/debian-12.qcow2"
KERNEL = "kernel:file:///srv/herdsman/images/test-guest/manifest.json"

# (id, document, path, message fragment)
INVALID: list[tuple[str, Any, str, str]] = [
    ("size unit", {"disks": [{"name": "d", "size": "10q"}]}, "disks.0.size", "'10q' is not a size"),
    ("size zero", {"disks": [{"name": "d", "size": "0"}]}, "disks.0.size", "smaller than 1 MiB"),
    ("size fractional bytes", {"disks": [{"name": "d", "size": "1.5"}]}, "disks.0.size", "not a whole number of bytes"),
    ("size too large", {"disks": [{"name": "d", "size": "65t"}]}, "disks.0.size", "larger than 64 TiB"),
    ("cpuSet open range", {"cpuSet": "0-"}, "cpuSet", "is not a CPU list"),
    ("cpuSet backwards", {"cpuSet": "3-1"}, "cpuSet", "runs backwards"),
    ("cpuSet letters", {"cpuSet": "a"}, "cpuSet", "is not a CPU list"),
    ("port out of range", {"ports": ["70000"]}, "ports.0", "guest port '70000' is not a port number"),
    ("port protocol", {"ports": ["8080:80/icmp"]}, "ports.0", "protocol 'icmp'"),
    ("port host port", {"ports": ["1.2.3.4:x:80"]}, "ports.0", "host port 'x' is not a port number"),
    ("port ipv6 form", {"ports": ["[::1]80"]}, "ports.0", "written as [addr]:hostPort:guestPort"),
    ("port host address", {"ports": ["1.2.3:8080:80"]}, "ports.0", "'1.2.3' is not an IP address"),
    ("expose backwards", {"expose": ["80-70"]}, "expose.0", "runs backwards"),
    ("hostname leading hyphen", {"hostname": "-bad"}, "hostname", "label '-bad' must be 1-63"),
    ("hostname empty label", {"hostname": "a..b"}, "hostname", "label '' must be 1-63"),
    ("hostname long label", {"hostname": "a" * 64 + ".example"}, "hostname", "must be 1-63 letters"),
    ("domainName underscore", {"domainName": "x_y.example"}, "domainName", "label 'x_y'"),
    ("dns not an ip", {"dns": ["192.0.2"]}, "dns.0", "'192.0.2' is not an IP address"),
    ("dns too many", {"dns": ["192.0.2.1", "192.0.2.2", "192.0.2.3", "192.0.2.4"]}, "dns", "at most 3 items"),
    ("dnsSearch bad", {"dnsSearch": ["bad_domain"]}, "dnsSearch.0", "label 'bad_domain'"),
    ("label key hyphen", {"labels": {"-x": "1"}}, "labels.-x", "label key '-x' must be"),
    ("label key space", {"labels": {"a b": "1"}}, "labels.a b", "label key 'a b' must be"),
    ("label key empty", {"labels": {"": "1"}}, "labels.", "label key '' must be"),
    ("memory below guest", {"memoryMb": 1024, "memory": 1024 << 20}, "memory", "at least memoryMb (1024 MiB) plus 64 MiB"),
    ("memorySwap without memory", {"memorySwap": 1 << 30}, "memorySwap", "memorySwap needs memory"),
    ("memorySwap below memory", {"memory": 1 << 30, "memorySwap": 1 << 29}, "memorySwap", "must be at least memory"),
    ("networkMode host", {"networkMode": "host"}, "networkMode", "'managed', 'bridge' or 'none'"),
    ("restartPolicy name", {"restartPolicy": {"name": "sometimes"}}, "restartPolicy.name", "'no', 'always', 'on-failure'"),
    (
        "retries with always",
        {"restartPolicy": {"name": "always", "maximumRetryCount": 3}},
        "restartPolicy.maximumRetryCount",
        "only applies to restartPolicy 'on-failure'",
    ),
    ("healthCheck without port", {"healthCheck": {"interval": 2000}}, "healthCheck.port", "Field required"),
    (
        "quorum strategy without config",
        {"healthCheck": {"port": 80, "strategy": "recreateOnQuorum"}},
        "healthCheck.recreateOnQuorumStrategyConfig",
        "needs recreateOnQuorumStrategyConfig",
    ),
    (
        "quorum config without strategy",
        {"healthCheck": {"port": 80, "recreateOnQuorumStrategyConfig": {"quorum": 2}}},
        "healthCheck.recreateOnQuorumStrategyConfig",
        "only goes with strategy 'recreateOnQuorum'",
    ),
    ("requestLine with space", {"healthCheck": {"port": 80, "requestLine": "GET /a b"}}, "healthCheck.requestLine", "version 'b' must be HTTP/1.0 or HTTP/1.1"),
    ("requestLine method", {"healthCheck": {"port": 80, "requestLine": "GE(T /"}}, "healthCheck.requestLine", "method 'GE(T' is not an HTTP method"),
    ("requestLine header", {"healthCheck": {"port": 80, "requestLine": 'GET "/" "HTTP/1.1\\r\\nHost"'}}, "healthCheck.requestLine", "header line 'Host' must be 'Name: value'"),
    ("healthCheck interval", {"healthCheck": {"port": 80, "interval": 50}}, "healthCheck.interval", "at least 100 ms"),
    ("logConfig syslog", {"logConfig": {"driver": "syslog"}}, "logConfig.driver", "'file', 'json-file' or 'none'"),
    ("logConfig keys", {"logConfig": {"driver": "file", "config": {"max-size": "10m"}}}, "logConfig.config", "options max-size are not supported"),
    ("disk name", {"disks": [{"name": "Bad Name"}]}, "disks.0.name", "is not a disk name"),
    ("disk name duplicate", {"disks": [{"name": "a"}, {"name": "b"}, {"name": "a"}]}, "disks.2.name", "must be unique: a repeated"),
    ("two root disks", {"disks": [{"name": "a", "root": True}, {"name": "b", "root": True}]}, "disks.1.root", "only one disk can be root"),
    ("root disk with kernel", {"imageUuid": KERNEL, "disks": [{"name": "r", "root": True}]}, "disks.0.root", "no disk can be root"),
    (
        "raw root on an image",
        {"imageUuid": IMG, "disks": [{"name": "r", "root": True, "opts": {"format": "raw"}}]},
        "disks.0.opts.format",
        "it cannot be raw",
    ),
    ("disk opts unknown key", {"disks": [{"name": "a", "opts": {"iothread": "1"}}]}, "disks.0.opts.iothread", "unknown field"),
    ("disk opts bus", {"disks": [{"name": "a", "opts": {"bus": "ide"}}]}, "disks.0.opts.bus", "'virtio', 'scsi' or 'sata'"),
    ("disk pool path", {"disks": [{"name": "a", "driver": "../etc"}]}, "disks.0.driver", "is not a storage pool name"),
    ("volumeDriver path", {"volumeDriver": "/var/lib"}, "volumeDriver", "is not a storage pool name"),
    ("too many disks", {"disks": [{"name": f"d{i}"} for i in range(17)]}, "disks", "at most 16 items"),
    ("docker image", {"imageUuid": "docker:ubuntu:22.04"}, "imageUuid", "is a container image"),
    ("ftp image", {"imageUuid": "ftp://example.com/x.qcow2"}, "imageUuid", "must be file://, http:// or https://"),
    ("relative file image", {"imageUuid": "file://images/x.qcow2"}, "imageUuid", "needs an absolute path"),
    ("checksum not hex", {"imageUuid": IMG + "#sha256=xyz"}, "imageUuid", "is not a hex digest"),
    ("checksum length", {"imageUuid": IMG + "#sha256=abcd"}, "imageUuid", "needs 64 hex digits"),
    ("command with disk image", {"imageUuid": IMG, "command": ["console=ttyS0"]}, "command", "kernel command line of a kernel: image"),
    ("command without image", {"command": ["console=ttyS0"]}, "command", "kernel command line of a kernel: image"),
    ("command argument spaces", {"imageUuid": KERNEL, "command": ["quiet", "a b"]}, "command.1", "holds white space or quotes"),
    ("vcpu as text", {"vcpu": "2"}, "vcpu", "Input should be a valid integer"),
    ("vcpu as float", {"vcpu": 2.0}, "vcpu", "Input should be a valid integer"),
    ("vcpu zero", {"vcpu": 0}, "vcpu", "greater than or equal to 1"),
    ("memoryMb tiny", {"memoryMb": 8}, "memoryMb", "greater than or equal to 16"),
    ("cpuShares low", {"cpuShares": 1}, "cpuShares", "greater than or equal to 2"),
    ("startOnCreate as text", {"startOnCreate": "true"}, "startOnCreate", "valid boolean"),
    ("unknown field", {"vcpus": 2}, "vcpus", "unknown field"),
    ("instanceLinks", {"instanceLinks": {"db": "1i5"}}, "instanceLinks", "links are a container feature"),
    ("securityOpt", {"securityOpt": ["seccomp=unconfined"]}, "securityOpt.0", "'seccomp=unconfined' is not supported"),
    ("uuid", {"uuid": "not-a-uuid"}, "uuid", "'not-a-uuid' is not a UUID"),
    ("extraHosts without ip", {"extraHosts": ["db"]}, "extraHosts.0", "is not 'hostname:ip'"),
    ("extraHosts bad ip", {"extraHosts": ["db:1.2.3"]}, "extraHosts.0", "'1.2.3' is not an IP address"),
    ("extraHosts bad name", {"extraHosts": ["d b:10.0.0.1"]}, "extraHosts.0", "is not a valid host name"),
    ("name two lines", {"name": "two\nlines"}, "name", "control character U+000A"),
    ("name too long", {"name": "x" * 256}, "name", "at most 255 characters"),
    ("reference charset", {"requestedHostId": "1h 5"}, "requestedHostId", "should match pattern"),
    ("not an object", ["vcpu", 2], "", "valid dictionary"),
    (
        "cattle instance data.fields not an object",
        {"kind": "virtualMachine", "state": "creating", "data": {"fields": ["vcpu", 2]}},
        "instance.data.fields",
        "must be an object",
    ),
    (
        "cattle event data.fields not an object",
        {
            "name": "compute.instance.activate",
            "data": {"instanceHostMap": {"instance": {"kind": "virtualMachine", "data": {"fields": "vcpu=2"}}}},
        },
        "instance.data.fields",
        "must be an object",
    ),
    (
        "cattle event bad field",
        {
            "name": "compute.instance.activate",
            "data": {"instanceHostMap": {"instance": {"kind": "virtualMachine", "memoryMb": "512", "data": {"fields": {}}}}},
        },
        "memoryMb",
        "valid integer",
    ),
]


def test_enough_distinct_invalid_cases() -> None:
    assert len(INVALID) >= 25
    assert len({case[0] for case in INVALID}) == len(INVALID)


@pytest.mark.parametrize(("document", "path", "fragment"), [c[1:] for c in INVALID], ids=[c[0] for c in INVALID])
def test_invalid_spec(document: Any, path: str, fragment: str) -> None:
    with pytest.raises(SpecError) as info:
        spec_from_document(document)
    errors = [(e.path, e.message) for e in info.value.errors]
    assert [p for p, _ in errors] == [path], errors
    assert fragment in errors[0][1]
    assert str(info.value) == (f"{path}: {errors[0][1]}" if path else errors[0][1])


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(SpecError) as info:
        spec_from_document({"vcpu": "2", "hostname": "-bad", "ports": ["ok", "80"], "dns": ["x"]})
    assert sorted(e.path for e in info.value.errors) == ["dns.0", "hostname", "ports.0", "vcpu"]


# --- action inputs -------------------------------------------------------------------------


def test_action_defaults_follow_the_api() -> None:
    assert ContainerLogs.model_validate({}).to_api() == {"follow": True, "lines": 100}
    assert ContainerProxy.model_validate({}).to_api() == {"port": 80, "scheme": "http"}
    assert ContainerExec.model_validate({"command": ["ls"]}).to_api() == {
        "attachStdin": True,
        "attachStdout": True,
        "command": ["ls"],
        "tty": True,
    }
    assert InstanceStop.model_validate({}).to_api() == {}
    assert SetLabelsInput.model_validate({}).labels == {}
    assert InstanceConsoleInput.model_validate({"anything": 1}).to_api() == {"kind": "serial"}


@pytest.mark.parametrize(
    ("model", "document", "path", "fragment"),
    [
        (ContainerExec, {}, "command", "Field required"),
        (ContainerExec, {"command": []}, "command", "at least 1 item"),
        (ContainerExec, {"command": ["ls"], "tty": "yes"}, "tty", "valid boolean"),
        (ContainerLogs, {"lines": -1}, "lines", "greater than or equal to 0"),
        (ContainerLogs, {"follow": 1}, "follow", "valid boolean"),
        (ContainerProxy, {"port": 0}, "port", "greater than or equal to 1"),
        (ContainerProxy, {"scheme": "ftp"}, "scheme", "'http' or 'https'"),
        (InstanceStop, {"timeout": 3601}, "timeout", "less than or equal to 3600"),
        (SetLabelsInput, {"labels": {"a b": "x"}}, "labels.a b", "label key 'a b' must be"),
        (ContainerLogs, {"lines": 10, "since": "1h"}, "since", "unknown field"),
    ],
)
def test_invalid_action_input(model: Any, document: dict, path: str, fragment: str) -> None:
    with pytest.raises(ValidationError) as info:
        model.model_validate(document)
    errors = SpecError.from_validation(info.value).errors
    assert [e.path for e in errors] == [path]
    assert fragment in errors[0].message


def test_action_values_are_kept() -> None:
    logs = ContainerLogs.model_validate({"follow": False, "lines": 5})
    assert (logs.follow, logs.lines) == (False, 5)
    execute = ContainerExec.model_validate({"command": ["sh", "-c", "echo <x>"], "attachStdin": False, "tty": False})
    assert (execute.command, execute.attach_stdin, execute.attach_stdout, execute.tty) == (["sh", "-c", "echo <x>"], False, True, False)
    assert SetLabelsInput.model_validate({"labels": {"io.example": "<&>"}}).labels == {"io.example": "<&>"}


# --- the command line ----------------------------------------------------------------------


def _herdsman(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent", *args], capture_output=True, text=True, cwd=REPO, timeout=60, check=False)


def test_validate_prints_each_error_with_file_and_path(tmp_path: Path) -> None:
    spec = tmp_path / "bad.json"
    spec.write_text(json.dumps({"vcpu": "2", "hostname": "-bad", "memorySwap": 1 << 30, "labels": {"a b": "x"}}))
    proc = _herdsman("validate", str(spec))
    assert proc.returncode == 1
    assert proc.stdout == ""
    lines = sorted(proc.stderr.splitlines())
    assert [line.split(": ")[:2] for line in lines] == [
        [str(spec), "hostname"],
        [str(spec), "labels.a b"],
        [str(spec), "vcpu"],
    ]
    assert f"{spec}: vcpu: Input should be a valid integer" in lines


def test_validate_reports_cross_field_errors_with_their_path(tmp_path: Path) -> None:
    spec = tmp_path / "swap.json"
    spec.write_text(json.dumps({"memorySwap": 1 << 30}))
    proc = _herdsman("validate", str(spec))
    assert (proc.returncode, proc.stderr) == (1, f"{spec}: memorySwap: memorySwap needs memory (it is memory plus swap, as in docker)\n")


def test_validate_accepts_a_good_spec() -> None:
    proc = _herdsman("validate", "examples/web.json")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("examples/web.json: valid virtualMachine web-1 (")


def test_validate_reads_standard_input() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "agent", "validate", "-"], input='{"networkMode": "host"}', capture_output=True, text=True, cwd=REPO, check=False
    )
    assert proc.returncode == 1
    assert proc.stderr.startswith("-: networkMode: Input should be")


def test_render_prints_the_domain() -> None:
    proc = _herdsman("render", "examples/web.json")
    assert proc.returncode == 0, proc.stderr
    root = etree.fromstring(proc.stdout.encode())
    assert root.tag == "domain" and root.get("type") == "qemu"
    assert root.findtext("title") == "web-1"
    assert root.findtext("vcpu") == "2"
    assert [d.findtext("serial") for d in root.iterfind("devices/disk[@device='disk']")] == ["root", "data"]


def test_render_refuses_what_the_host_cannot_do(tmp_path: Path) -> None:
    spec = tmp_path / "sctp.json"
    spec.write_text(json.dumps({"name": "x", "ports": ["3868:3868/sctp"]}))
    proc = _herdsman("render", "--session", str(spec))
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert proc.stderr.startswith(f"{spec}: ports: 3868:3868/sctp: user-mode networking forwards only tcp and udp")


def test_render_reports_spec_errors(tmp_path: Path) -> None:
    spec = tmp_path / "bad.json"
    spec.write_text(json.dumps({"imageUuid": "docker:nginx"}))
    proc = _herdsman("render", str(spec))
    assert proc.returncode == 1
    assert proc.stderr.startswith(f"{spec}: imageUuid: 'docker:nginx' is a container image")
