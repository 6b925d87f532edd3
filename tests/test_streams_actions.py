"""compute.instance.console/.execute/.logs/.proxy through the real agent, and both token modes."""

from __future__ import annotations

import asyncio
import datetime
import socket
import time
from pathlib import Path

import jwt
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from agent.config import AgentConfig
from agent.streams.actions import default_stream_url
from agent.streams.client import StreamDenied, messages, open_stream
from tests.agent_harness import instance_event, running_agent, vm_instance

pytestmark = pytest.mark.timeout(120)
LOCAL = {"stream_listen": "127.0.0.1:0"}


def reply_body(reply: dict) -> dict:
    assert reply.get("transitioning") is None, reply.get("transitioningMessage")
    return reply["data"]["instanceHostMap"]


def error_of(reply: dict) -> str:
    assert reply.get("transitioning") == "error", reply
    return str(reply.get("transitioningMessage"))


async def test_each_action_hands_out_a_url_and_a_short_lived_token_for_this_vm(tmp_path) -> None:
    async with running_agent(tmp_path, **LOCAL) as (ctl, agent):
        inst = vm_instance("actions")
        await instance_event(ctl, "activate", inst)
        base = f"ws://127.0.0.1:{agent.streams.port}"
        expected = {
            "console": ("console", "/v1/console/", {}, {"container": inst["uuid"]}),
            "execute": ("exec", "/v1/exec/", {"command": ["uname", "-a"], "tty": False},
                        {"AttachStdin": True, "AttachStdout": True, "Tty": False, "Cmd": ["uname", "-a"],
                         "Container": inst["uuid"]}),
            "logs": ("logs", "/v1/logs/", {"lines": 7, "follow": False},
                     {"Container": inst["uuid"], "Lines": 7, "Follow": False}),
            "proxy": ("proxy", "/v1/container-proxy/", {"port": 8080},
                      {"Container": inst["uuid"], "port": 8080, "scheme": "http"}),
        }
        for action, (kind, path, process, payload) in expected.items():
            body = reply_body(await instance_event(ctl, action, inst, process=process))
            assert body["url"] == base + path
            claims = agent.stream_verifier.verify(body["token"], kind)
            assert claims.instance == inst["uuid"] and claims.payload == payload
            raw = jwt.decode(body["token"], options={"verify_signature": False})
            assert raw["hostUuid"] == agent.host_uuid and raw["exp"] - raw["iat"] == 300
            assert jwt.get_unverified_header(body["token"])["alg"] == "HS256"
            if action == "console":
                assert body["kind"] == "serial"
        # the input may also come as data.<inputType> (no processData)
        reply = await ctl.request("compute.instance.logs", {"instanceHostMap": {"instance": inst},
                                                            "containerLogs": {"lines": 3}},
                                  resource_type="instanceHostMap", resource_id="ihm-x")
        assert agent.stream_verifier.verify(reply_body(reply)["token"], "logs").payload["Lines"] == 3


async def test_bad_input_and_unknown_vms_get_no_token(tmp_path) -> None:
    async with running_agent(tmp_path, **LOCAL) as (ctl, _):
        inst = vm_instance("actions-bad")
        await instance_event(ctl, "activate", inst)
        assert "processData.command" in error_of(await instance_event(ctl, "execute", inst, process={"tty": True}))
        assert "processData.lines" in error_of(await instance_event(ctl, "logs", inst, process={"lines": -1}))
        assert "processData.port" in error_of(await instance_event(ctl, "proxy", inst, process={"port": 0}))
        assert "processData.scheme" in error_of(await instance_event(ctl, "proxy", inst, process={"scheme": "ftp"}))
        stranger = vm_instance("not-here")
        message = error_of(await instance_event(ctl, "logs", stranger))
        assert "no virtual machine" in message and stranger["uuid"] in message
        # the console takes no input: whatever a controller adds is ignored
        assert reply_body(await instance_event(ctl, "console", inst, process={"kind": "vnc", "extra": 1}))["token"]


async def test_a_minted_logs_token_opens_the_stream_and_only_for_its_vm(tmp_path) -> None:
    async with running_agent(tmp_path, **LOCAL) as (ctl, agent):
        a, b = vm_instance("vm-a"), vm_instance("vm-b")
        for inst in (a, b):
            await instance_event(ctl, "activate", inst)
            log = tmp_path / "log" / "console" / f"{inst['uuid']}.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            log.write_text(f"I am {inst['name']}\r\nsecond line\r\n")
        body = reply_body(await instance_event(ctl, "logs", a, process={"follow": False}))
        async with open_stream(body["url"], body["token"]) as ws:
            assert [m async for m in messages(ws)] == ["00 I am vm-a", "00 second line"]
        with pytest.raises(StreamDenied) as caught:  # A's token naming B
            async with open_stream(body["url"] + b["uuid"], body["token"]):
                pass
        assert caught.value.status == 403
        with pytest.raises(StreamDenied) as caught:  # a logs token on the exec path
            async with open_stream(body["url"].replace("/v1/logs/", "/v1/exec/"), body["token"]):
                pass
        assert caught.value.status in (403, 404)


async def test_configured_stream_url_is_what_replies_carry(tmp_path) -> None:
    async with running_agent(tmp_path, stream_url="wss://streams.example:443/", **LOCAL) as (ctl, _):
        inst = vm_instance("url")
        await instance_event(ctl, "activate", inst)
        assert reply_body(await instance_event(ctl, "logs", inst))["url"] == "wss://streams.example:443/v1/logs/"


async def test_without_a_stream_server_the_agent_runs_on_and_says_why(tmp_path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        async with running_agent(tmp_path, stream_listen=f"127.0.0.1:{port}") as (ctl, agent):
            inst = vm_instance("no-streams")
            reply = await instance_event(ctl, "activate", inst)
            assert reply.get("transitioning") is None  # VMs are still managed
            assert "stream server is not running" in error_of(await instance_event(ctl, "logs", inst))
            assert not agent.streams.running


def _controller_key(folder: Path) -> tuple[rsa.RSAPrivateKey, Path]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "cattle")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=365)).sign(key, hashes.SHA256()))
    path = folder / "api.crt"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key, path


def cattle_logs_token(key: rsa.RSAPrivateKey, host: str, vm: str) -> str:
    now = int(time.time())
    return jwt.encode({"logs": {"Container": vm, "Lines": 1, "Follow": False}, "hostUuid": host, "iat": now,
                       "exp": now + 600, "sub": "1a5", "iss": "cattle"}, key, algorithm="RS256")


async def _wait_rs256(agent, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while "RS256" not in agent.stream_verifier.accepts:
        assert time.monotonic() < deadline, "the controller key was never loaded"
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("source", ["file", "url"])
async def test_controller_minted_rs256_tokens_open_streams(tmp_path, source) -> None:
    key, cert = _controller_key(tmp_path)
    runner = None
    location = str(cert)
    if source == "url":  # served like {CATTLE_URL}/scripts/api.crt
        app = web.Application()
        async def api_crt(_: web.Request) -> web.Response:
            return web.Response(body=cert.read_bytes())

        app.router.add_get("/v2-beta/scripts/api.crt", api_crt)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        location = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/v2-beta/scripts/api.crt"
    try:
        async with running_agent(tmp_path, controller_public_key=location, **LOCAL) as (ctl, agent):
            inst = vm_instance("rs256")
            await instance_event(ctl, "activate", inst)
            log = tmp_path / "log" / "console" / f"{inst['uuid']}.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            log.write_text("signed by the controller\n")
            await _wait_rs256(agent)
            url = f"ws://127.0.0.1:{agent.streams.port}/v1/logs/"
            async with open_stream(url, cattle_logs_token(key, agent.host_uuid, inst["uuid"]), bearer=True) as ws:
                assert [m async for m in messages(ws)] == ["00 signed by the controller"]
            forged_by = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            with pytest.raises(StreamDenied) as caught:
                async with open_stream(url, cattle_logs_token(forged_by, agent.host_uuid, inst["uuid"])):
                    pass
            assert caught.value.status == 401
    finally:
        if runner is not None:
            await runner.cleanup()


def test_default_stream_url() -> None:
    assert default_stream_url("10.1.2.3", 9345, tls=True, controller_url=None) == "wss://10.1.2.3:9345"
    assert default_stream_url("::1", 9345, tls=False, controller_url=None) == "ws://[::1]:9345"
    # listening everywhere: the address this host uses toward the controller
    assert default_stream_url("0.0.0.0", 9345, tls=False, controller_url="http://127.0.0.1:8080/v1") == "ws://127.0.0.1:9345"
    assert default_stream_url(None, 1, tls=False, controller_url=None).startswith("ws://")


def test_stream_settings_are_checked() -> None:
    assert AgentConfig().stream_listen == "0.0.0.0:9345"
    assert AgentConfig(stream_url="wss://agent.example:9345/").stream_url == "wss://agent.example:9345"
    for bad in ({"stream_listen": "9345"}, {"stream_listen": "host:99999"}, {"stream_url": "http://x"}):
        with pytest.raises(ValueError):
            AgentConfig(**bad)
