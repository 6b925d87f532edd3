"""The stream server's transport behaviour: subprotocols, back-pressure, keepalive, failures, TLS."""

from __future__ import annotations

import asyncio
import base64
import datetime
import ipaddress
import os
import socket
import ssl
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from agent.streams.auth import Claims, TokenVerifier, mint_local
from agent.streams.client import messages, open_stream
from agent.streams.server import StreamServer, route_of

HOST = str(uuid.uuid4())
VM = str(uuid.uuid4())
SECRET = os.urandom(32)


def token(kind: str = "logs") -> str:
    container = {"container": VM} if kind == "console" else {"Container": VM}
    return mint_local(SECRET, HOST, kind, container, ttl=60)


@pytest.fixture
async def serve() -> AsyncIterator[Callable[..., Awaitable[StreamServer]]]:
    servers: list[StreamServer] = []

    async def start(handler, **options) -> StreamServer:
        server = StreamServer("127.0.0.1:0", TokenVerifier(HOST, local_secret=SECRET),
                              {"logs": handler, "console": handler}, **options)
        await server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.close()


def test_paths_map_to_kinds() -> None:
    assert route_of("/v1/logs/") == ("logs", None)
    assert route_of("/v1/logs") == ("logs", None)
    assert route_of(f"/v1/exec/{VM}") == ("exec", VM)
    assert route_of("/v1/container-proxy/") == ("proxy", None)
    assert route_of("/v1/logs/a/b") is None
    assert route_of("/v1/stats") is None


@pytest.mark.parametrize(("offered", "chosen"), [(["binary"], "binary"), (None, None), (["base64"], None),
                                                 (["base64", "binary"], "binary")])
async def test_binary_subprotocol_only_when_offered(serve, offered, chosen) -> None:
    async def report(ws, claims: Claims) -> None:
        await ws.send(repr(ws.subprotocol))

    server = await serve(report)
    url = f"ws://127.0.0.1:{server.port}/v1/console/?token={token('console')}"
    async with connect(url, subprotocols=offered) as ws:
        assert ws.subprotocol == chosen
        assert await ws.recv() == repr(chosen)


async def _raw_websocket(port: int, path: str, *, rcvbuf: int | None = None) -> tuple[socket.socket, bytes]:
    """A client that does the opening handshake by hand and then reads only when told to."""
    sock = socket.socket()
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, ("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    await loop.sock_sendall(sock, (f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                                   f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                                   f"Sec-WebSocket-Version: 13\r\n\r\n").encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += await loop.sock_recv(sock, 1)
    assert head.startswith(b"HTTP/1.1 101 "), head
    return sock, head


async def test_a_client_that_stops_reading_back_pressures_only_its_own_stream(serve) -> None:
    """The handler wants to send 48 MiB; the client reads nothing. send() blocks once the
    socket buffers and the connection's write_limit are full, so the agent holds at most
    write_limit unsent bytes; when the client reads again everything arrives, in order."""
    total, chunk, limit = 48 << 20, 64 << 10, 256 << 10
    progress = {"sent": 0, "max_buffered": 0, "done": False}

    async def firehose(ws, claims: Claims) -> None:
        for index in range(total // chunk):
            await ws.send(index.to_bytes(4, "big") * (chunk // 4))
            progress["sent"] += chunk
            progress["max_buffered"] = max(progress["max_buffered"], ws.transport.get_write_buffer_size())
        progress["done"] = True

    async def chat(ws, claims: Claims) -> None:
        await ws.send("pong:" + await ws.recv())

    server = await serve(firehose, write_limit=limit, ping_interval=60)
    sock, _ = await _raw_websocket(server.port, f"/v1/logs/?token={token()}", rcvbuf=64 << 10)
    try:
        stalled_at, last, since = None, -1, time.monotonic()
        while time.monotonic() - since < 1.0:  # until nothing moved for a second
            await asyncio.sleep(0.1)
            if progress["sent"] != last:
                last, since = progress["sent"], time.monotonic()
        stalled_at = progress["sent"]
        assert not progress["done"]
        # kernel socket buffers (both ends) plus write_limit: a few MiB at most, not 48
        assert stalled_at < 8 << 20, stalled_at
        assert progress["max_buffered"] <= limit + chunk + 16, progress["max_buffered"]
        print(f"\nstalled after {stalled_at / (1 << 20):.1f} MiB of 48; agent-side buffer peaked at "
              f"{progress['max_buffered'] / 1024:.0f} KiB (write_limit {limit // 1024} KiB)")

        # another stream on the same server is not slowed down by the stalled one
        other = connect(f"ws://127.0.0.1:{server.port}/v1/console/?token={token('console')}")
        server.routes["console"] = chat
        async with other as ws:
            started = time.monotonic()
            await ws.send("ping")
            assert await ws.recv() == "pong:ping"
            assert time.monotonic() - started < 0.5

        # the slow client reads again: every byte arrives
        loop = asyncio.get_running_loop()
        received, tail = 0, b""
        close_frame = b"\x88\x02\x03\xe8"  # the handler returned: close 1000
        expected = (total // chunk) * (chunk + 10) + len(close_frame)  # 10-byte header per 64 KiB frame
        while received < expected:
            data = await asyncio.wait_for(loop.sock_recv(sock, 1 << 20), 10)
            assert data, "server closed early"
            received += len(data)
            tail = (tail + data)[-4:]
        assert received == expected and tail == close_frame and progress["done"]
    finally:
        sock.close()


async def test_pings_keep_an_idle_stream_open(serve) -> None:
    async def echo_after_idle(ws, claims: Claims) -> None:
        message = await ws.recv()
        await ws.send(f"{message} latency={ws.latency:.4f}")
        await ws.wait_closed()

    server = await serve(echo_after_idle, ping_interval=0.3)
    # the client never pings on its own: only the server's pings (and the client's automatic
    # pongs) cross the connection while it idles for 7 ping intervals
    async with open_stream(f"ws://127.0.0.1:{server.port}/v1/logs/", token(), ping_interval=None) as ws:
        await asyncio.sleep(2.1)
        await ws.send("still-here")
        reply = await ws.recv()
    assert reply.startswith("still-here latency=")
    assert float(reply.split("=")[1]) > 0  # a pong came back for a keepalive ping


async def test_a_peer_that_stops_answering_pings_is_dropped(serve) -> None:
    ended: asyncio.Future[tuple[float, str]] = asyncio.get_running_loop().create_future()

    async def idle(ws, claims: Claims) -> None:
        started = time.monotonic()
        await ws.wait_closed()
        sent = ws.protocol.close_sent
        ended.set_result((time.monotonic() - started, f"{sent.code} {sent.reason}" if sent else ""))

    server = await serve(idle, ping_interval=0.3)
    sock, _ = await _raw_websocket(server.port, f"/v1/logs/?token={token()}")
    try:
        seconds, close = await asyncio.wait_for(ended, 5)
    finally:
        sock.close()
    # ping after 0.3 s, no pong within 0.3 s, close frame unanswered for 0.3 s: gone
    assert close == "1011 keepalive ping timeout" and seconds < 1.5, (seconds, close)


async def test_a_client_that_reads_nothing_for_stall_timeout_is_cut_off(serve) -> None:
    """With its buffers full even a keepalive ping cannot go out; the stall timeout ends it."""
    ended: asyncio.Future[float] = asyncio.get_running_loop().create_future()

    async def firehose(ws, claims: Claims) -> None:
        started = time.monotonic()
        try:
            while True:
                await ws.send(b"x" * 65536)
        finally:
            ended.set_result(time.monotonic() - started)

    server = await serve(firehose, write_limit=64 << 10, ping_interval=0.3, stall_timeout=1.0)
    sock, _ = await _raw_websocket(server.port, f"/v1/logs/?token={token()}", rcvbuf=64 << 10)
    try:
        seconds = await asyncio.wait_for(ended, 10)
    finally:
        sock.close()
    assert 1.0 <= seconds < 3.0, seconds


async def test_a_failing_handler_closes_its_stream_with_the_reason_and_the_server_goes_on(serve) -> None:
    async def broken(ws, claims: Claims) -> None:
        raise RuntimeError("guest exploded")

    server = await serve(broken)
    for _ in range(2):
        async with open_stream(f"ws://127.0.0.1:{server.port}/v1/logs/", token()) as ws:
            with pytest.raises(ConnectionClosed) as caught:
                await ws.recv()
        assert caught.value.rcvd.code == 1011 and caught.value.rcvd.reason == "guest exploded"


async def test_closing_the_server_closes_open_streams_as_going_away(serve) -> None:
    opened = asyncio.Event()

    async def wait(ws, claims: Claims) -> None:
        opened.set()
        await ws.wait_closed()

    server = await serve(wait)
    async with open_stream(f"ws://127.0.0.1:{server.port}/v1/logs/", token()) as ws:
        await opened.wait()
        await asyncio.wait_for(server.close(), 5)
        with pytest.raises(ConnectionClosed) as caught:
            await ws.recv()
    assert caught.value.rcvd.code == 1001


def _self_signed(folder: Path) -> tuple[Path, Path]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "herdsman-test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = folder / "stream.crt", folder / "stream.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


async def test_tls(serve, tmp_path) -> None:
    cert, key = _self_signed(tmp_path)
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)

    async def hello(ws, claims: Claims) -> None:
        await ws.send(f"hello over TLS for {claims.instance}")

    server = await serve(hello, ssl_context=server_context)
    client_context = ssl.create_default_context(cafile=str(cert))
    async with open_stream(f"wss://127.0.0.1:{server.port}/v1/logs/", token(), ssl_context=client_context) as ws:
        assert [m async for m in messages(ws)] == [f"hello over TLS for {VM}"]
    with pytest.raises(ssl.SSLError):  # an untrusting client does not get in
        async with open_stream(f"wss://127.0.0.1:{server.port}/v1/logs/", token(),
                               ssl_context=ssl.create_default_context()):
            pass
