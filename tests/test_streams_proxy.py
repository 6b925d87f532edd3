"""The proxy stream: Cattle's HTTPMessage framing and raw TCP to busybox httpd in the real guest."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import ipaddress
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import pytest_asyncio
from websockets.exceptions import ConnectionClosed

from agent.config import secret
from agent.streams.auth import mint_local
from agent.streams.client import messages, open_stream
from agent.streams.proxy import (
    ProxyRefused,
    choose_address,
    request_head,
)
from drivers.libvirt.stream_access import network_ranges
from tests.agent_harness import instance_event
from tests.streams_vm import NetGuest, net_guest

pytestmark = pytest.mark.timeout(600)
on_module_loop = pytest.mark.asyncio(loop_scope="module")

NETWORK_XML = """<network><name>default</name><bridge name='virbr0'/>
  <ip address='192.168.122.1' netmask='255.255.255.0'><dhcp><range start='192.168.122.2' end='192.168.122.254'/></dhcp></ip>
  <ip family='ipv6' address='fd00:1::1' prefix='64'/></network>"""


# -- the address rule ------------------------------------------------------------------------------
def test_address_rule() -> None:
    ranges, hosts = network_ranges(NETWORK_XML)
    assert [str(r) for r in ranges] == ["192.168.122.0/24", "fd00:1::/64"]
    primary = "192.168.122.50"
    assert choose_address(None, primary, ranges, hosts) == primary
    assert choose_address(primary, primary, ranges, hosts) == primary
    assert choose_address("192.168.122.77", primary, ranges, hosts) == "192.168.122.77"  # another guest
    assert choose_address("fd00:1::9", primary, ranges, hosts) == "fd00:1::9"
    for refused in ("8.8.8.8", "127.0.0.1", "192.168.122.1", "192.168.122.0", "192.168.122.255", "10.0.0.5",
                    "fd00:1::1", "::1"):
        with pytest.raises(ProxyRefused):
            choose_address(refused, primary, ranges, hosts)
    with pytest.raises(ProxyRefused, match="no known address"):
        choose_address(None, None, ranges, hosts)
    # without the network (unknown, libvirt away) only the VM's own address is allowed
    assert choose_address(primary, primary, [], set()) == primary
    with pytest.raises(ProxyRefused):
        choose_address("192.168.122.77", primary, [], set())


def test_request_head_takes_only_path_and_query_from_the_url() -> None:
    method, path, headers, host = request_head({"method": "GET", "url": "http://169.254.169.254:80/a/b?c=1#frag",
                                                "headers": {"Accept": ["*/*"], "X-Two": ["1", "2"]},
                                                "host": "app.example"})
    assert (method, path, host) == ("GET", "/a/b?c=1", "app.example")
    assert headers == [("Accept", "*/*"), ("X-Two", "1"), ("X-Two", "2")]
    for bad in ({"method": "GET /x HTTP/1.1\r\nHost: evil"}, {"url": "/a\r\nX-Injected: 1"},
                {"headers": {"X-A": ["ok\r\nX-Injected: 1"]}}, {"headers": {"Bad Name": ["1"]}},
                {"host": "a\r\nb"}):
        with pytest.raises(ProxyRefused):
            request_head(bad)


# -- the real guest --------------------------------------------------------------------------------
USERDATA = """#!/bin/sh
mkdir -p /www/cgi-bin
echo HELLO-FROM-GUEST-HTTPD > /www/index.html
i=0; while [ $i -lt 6000 ]; do echo "line $i of a file big enough to need many chunks ......"; i=$((i+1)); done > /www/big.txt
printf '#!/bin/sh\\necho "Content-Type: text/plain"\\necho\\necho "method=$REQUEST_METHOD length=$CONTENT_LENGTH"\\ncat\\n' > /www/cgi-bin/echo
chmod 755 /www/cgi-bin/echo
busybox httpd -p 80 -h /www
echo HTTPD-STARTED
"""


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def guest() -> AsyncIterator[NetGuest]:
    async with net_guest("proxy-guest", USERDATA, ready_marker="HERDSMAN-GUEST: ready") as booted:
        deadline = time.monotonic() + 60
        while not (await booted.agent.driver.guest_network(booted.uuid)).primary:
            assert time.monotonic() < deadline, "the guest never got an address"
            await asyncio.sleep(0.5)
        yield booted


async def grant(guest: NetGuest, **process: Any) -> tuple[str, str]:
    """A proxy token the way a user gets one: compute.instance.proxy through the controller."""
    reply = await instance_event(guest.ctl, "proxy", guest.instance, process=process)
    assert reply.get("transitioning") is None, reply.get("transitioningMessage")
    body = reply["data"]["instanceHostMap"]
    assert body["url"] == f"{guest.stream_base}/v1/container-proxy/"
    return body["url"], body["token"]


def local_token(guest: NetGuest, **payload: Any) -> str:
    return mint_local(secret(guest.agent.config, "streams"), guest.agent.host_uuid, "proxy",
                      {"Container": guest.uuid, **payload})


async def exchange(url: str, token: str, *requests: dict[str, Any]) -> tuple[dict[str, Any], bytes, list[dict]]:
    """Send HTTPMessages; return the head message, the whole body and every message received."""
    frames: list[dict[str, Any]] = []
    async with open_stream(url, token) as ws:
        for request in requests:
            if "body" in request:
                request = {**request, "body": base64.b64encode(request["body"]).decode()}
            await ws.send(json.dumps(request))
        async with asyncio.timeout(60):
            async for message in messages(ws):
                frames.append(json.loads(message))
    assert frames and frames[-1] == {"eof": True}, frames[-3:]
    body = b"".join(base64.b64decode(f.get("body", "")) for f in frames)
    return frames[0], body, frames


@on_module_loop
@pytest.mark.libvirtd
@pytest.mark.guest
async def test_get_a_page_from_busybox_httpd(guest: NetGuest) -> None:
    url, token = await grant(guest, port=80)
    head, body, _ = await exchange(url, token, {"host": "guest.example", "method": "GET", "url": "http://x/index.html",
                                                "headers": {"Accept": ["*/*"]}}, {"eof": True})
    assert head["code"] == 200 and body == b"HELLO-FROM-GUEST-HTTPD\n", (head, body[:300])
    assert "Content-Type" in head["headers"] or "content-type" in {k.lower() for k in head["headers"]}
    assert "Connection" not in head["headers"]  # hop-by-hop headers stay behind


@on_module_loop
@pytest.mark.libvirtd
@pytest.mark.guest
async def test_a_big_response_streams_in_chunks(guest: NetGuest) -> None:
    address = (await guest.agent.driver.guest_network(guest.uuid)).primary
    async with httpx.AsyncClient(trust_env=False) as client:
        direct = (await client.get(f"http://{address}/big.txt")).content
    url, token = await grant(guest)
    head, body, frames = await exchange(url, token, {"method": "GET", "url": "/big.txt"}, {"eof": True})
    assert head["code"] == 200
    assert hashlib.sha256(body).hexdigest() == hashlib.sha256(direct).hexdigest() and len(body) > 300_000
    assert len([f for f in frames if f.get("body")]) > 5


@on_module_loop
@pytest.mark.libvirtd
@pytest.mark.guest
async def test_a_request_body_sent_in_pieces_reaches_the_guest(guest: NetGuest) -> None:
    url, token = await grant(guest)
    head, body, _ = await exchange(url, token, {"method": "POST", "url": "/cgi-bin/echo",
                                                "headers": {"Content-Length": ["11"], "Content-Type": ["text/plain"]}},
                                   {"body": b"hello "}, {"body": b"guest", "eof": True})
    assert head["code"] == 200, body
    assert body == b"method=POST length=11\nhello guest"


@on_module_loop
@pytest.mark.libvirtd
@pytest.mark.guest
async def test_hijack_pipes_raw_bytes(guest: NetGuest) -> None:
    url, token = await grant(guest)
    _, raw, _ = await exchange(url, token, {"hijack": True, "method": "GET", "url": "/index.html",
                                            "headers": {"Connection": ["close"]}}, {"eof": True})
    assert raw.startswith(b"HTTP/1.") and b" 200 " in raw.split(b"\r\n")[0]
    assert raw.endswith(b"HELLO-FROM-GUEST-HTTPD\n")


@on_module_loop
@pytest.mark.libvirtd
@pytest.mark.guest
async def test_raw_tcp_with_the_binary_subprotocol(guest: NetGuest) -> None:
    url, token = await grant(guest, port=80)
    received = b""
    async with open_stream(url, token, binary=True) as ws:
        assert ws.subprotocol == "binary"
        await ws.send(b"GET /index.html HTTP/1.0\r\n\r\n")
        async with asyncio.timeout(30):
            async for message in messages(ws):
                assert isinstance(message, bytes)
                received += message
    assert received.startswith(b"HTTP/1.") and received.endswith(b"HELLO-FROM-GUEST-HTTPD\n")


@on_module_loop
@pytest.mark.libvirtd
@pytest.mark.guest
async def test_a_closed_port_is_a_502(guest: NetGuest) -> None:
    url, token = await grant(guest, port=81)
    head, body, _ = await exchange(url, token, {"method": "GET", "url": "/"}, {"eof": True})
    assert head["code"] == 502 and b"ConnectError" in body


@on_module_loop
@pytest.mark.libvirtd
@pytest.mark.guest
async def test_a_token_cannot_point_the_proxy_elsewhere(guest: NetGuest) -> None:
    url = f"{guest.stream_base}/v1/container-proxy/"
    primary = (await guest.agent.driver.guest_network(guest.uuid)).primary
    head, body, _ = await exchange(url, local_token(guest, address=f"{primary}:80"), {"url": "/"}, {"eof": True})
    assert head["code"] == 200 and body == b"HELLO-FROM-GUEST-HTTPD\n"
    network = ipaddress.ip_network(f"{primary}/24", strict=False)
    for address in ("8.8.8.8:80", "127.0.0.1:22", f"{network.network_address + 1}:53", f"{network.broadcast_address}:80",
                    "localhost:80"):
        started = time.monotonic()
        async with open_stream(url, local_token(guest, address=address)) as ws:
            with pytest.raises(ConnectionClosed) as caught:
                await ws.recv()
        assert caught.value.rcvd.code == 1008, (address, caught.value.rcvd)
        assert time.monotonic() - started < 1.0, address  # refused before any connection attempt
    # another guest address on the managed network is allowed: the request is made (and, with
    # no guest there, answered 502 by the agent)
    spare = str(network.broadcast_address - 2)
    assert spare != primary
    head, _, _ = await exchange(url, local_token(guest, address=f"{spare}:80"), {"url": "/"}, {"eof": True})
    assert isinstance(head.get("code"), int)
