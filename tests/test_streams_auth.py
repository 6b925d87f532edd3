"""Stream tokens: what opens a stream and what is refused, before any websocket exists."""

from __future__ import annotations

import asyncio
import base64
import datetime
import hashlib
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from agent.streams.auth import (
    AuthError,
    Claims,
    TokenVerifier,
    load_public_key,
    mint_local,
)
from agent.streams.client import StreamDenied, open_stream
from agent.streams.server import StreamRefused, StreamServer

HOST = str(uuid.uuid4())
VM_A = str(uuid.uuid4())
VM_B = str(uuid.uuid4())
SECRET = b"local-secret-for-tests-0123456789"


def _pem_public(key: rsa.RSAPrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


@pytest.fixture(scope="module")
def controller_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def other_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def certificate(controller_key: rsa.RSAPrivateKey) -> bytes:
    """A self-signed X.509 certificate around the controller key, like Cattle's api.crt."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "cattle")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(controller_key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30)).sign(controller_key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM)


def cattle_token(key: rsa.RSAPrivateKey, kind: str, payload: dict[str, Any], *, host: str = HOST,
                 exp_in: float = 600, **extra: Any) -> str:
    """An RS256 token shaped like Cattle's JwtTokenServiceImpl output."""
    now = int(time.time())
    claims = {kind: payload, "hostUuid": host, "exp": now + int(exp_in), "iat": now, "sub": "1a5", "iss": "cattle",
              "kid": "default", **extra}
    return jwt.encode(claims, key, algorithm="RS256")


def unsigned(claims: dict[str, Any], alg: str = "none") -> str:
    part = lambda obj: base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()  # noqa: E731
    return f"{part({'alg': alg, 'typ': 'JWT'})}.{part(claims)}."


def hs256_with_key_bytes(claims: dict[str, Any], key: bytes) -> str:
    """An HS256 token whose HMAC key is `key` (PyJWT itself refuses to make one from a PEM)."""
    part = lambda obj: base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()  # noqa: E731
    signing_input = f"{part({'alg': 'HS256', 'typ': 'JWT'})}.{part(claims)}"
    signature = hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{base64.urlsafe_b64encode(signature).rstrip(b'=').decode()}"


def exec_payload(vm: str = VM_A) -> dict[str, Any]:
    return {"AttachStdin": True, "AttachStdout": True, "Tty": True, "Cmd": ["/bin/sh"], "Container": vm}


# -- the verifier on its own ---------------------------------------------------------------------
def test_cattle_rs256_token_gives_the_claims(controller_key) -> None:
    verifier = TokenVerifier(HOST, public_key=_pem_public(controller_key))
    claims = verifier.verify(cattle_token(controller_key, "exec", exec_payload()), "exec")
    assert claims == Claims(kind="exec", instance=VM_A, payload=exec_payload(), subject="1a5",
                            expires=claims.expires)
    assert claims.expires > time.time() + 500


def test_certificate_works_as_the_public_key(controller_key, certificate) -> None:
    verifier = TokenVerifier(HOST, public_key=certificate)
    assert verifier.verify(cattle_token(controller_key, "logs", {"Container": VM_A}), "logs").instance == VM_A


def test_console_token_names_its_container_in_lower_case(controller_key) -> None:
    verifier = TokenVerifier(HOST, public_key=_pem_public(controller_key))
    token = cattle_token(controller_key, "console", {"container": VM_A.upper()})
    assert verifier.verify(token, "console").instance == VM_A


def test_local_token_round_trip() -> None:
    verifier = TokenVerifier(HOST, local_secret=SECRET)
    token = mint_local(SECRET, HOST, "logs", {"Container": VM_A, "Lines": 5, "Follow": False}, ttl=60)
    claims = verifier.verify(token, "logs")
    assert claims.payload == {"Container": VM_A, "Lines": 5, "Follow": False}
    assert 50 < claims.expires - time.time() <= 60


def test_non_rsa_controller_key_is_refused_at_load() -> None:
    with pytest.raises(ValueError, match="not a PEM"):
        load_public_key(b"hello")


def _refusals(controller_key, other_key) -> dict[str, tuple[str, str, int]]:
    """name → (token, kind opened, expected status)."""
    now = int(time.time())
    public_pem = _pem_public(controller_key)
    good = {"exec": exec_payload(), "hostUuid": HOST, "exp": now + 600}
    return {
        "missing": ("", "exec", 401),
        "garbage": ("not.a.jwt", "exec", 401),
        "forged signature": (cattle_token(other_key, "exec", exec_payload()), "exec", 401),
        "tampered payload": (_tamper(cattle_token(controller_key, "exec", exec_payload())), "exec", 401),
        "expired": (cattle_token(controller_key, "exec", exec_payload(), exp_in=-120), "exec", 401),
        "no exp": (jwt.encode({"exec": exec_payload(), "hostUuid": HOST}, controller_key, algorithm="RS256"), "exec", 401),
        "alg none": (unsigned(good), "exec", 401),
        "HS256 signed with the public key": (hs256_with_key_bytes(good, public_pem), "exec", 401),
        "HS256 with a wrong secret": (mint_local(b"another-secret-0123456789abcdefgh", HOST, "exec", exec_payload()), "exec", 401),
        "wrong host": (cattle_token(controller_key, "exec", exec_payload(), host=str(uuid.uuid4())), "exec", 403),
        "wrong kind": (cattle_token(controller_key, "logs", {"Container": VM_A}), "exec", 403),
        "no container": (cattle_token(controller_key, "exec", {"Cmd": ["sh"]}), "exec", 403),
        "container not a uuid": (cattle_token(controller_key, "exec", exec_payload("../../etc/passwd")), "exec", 403),
    }


def _tamper(token: str) -> str:
    header, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["exec"]["Container"] = VM_B
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    return f"{header}.{forged}.{signature}"


def test_every_bad_token_is_refused_with_its_status(controller_key, other_key) -> None:
    verifier = TokenVerifier(HOST, public_key=_pem_public(controller_key), local_secret=SECRET)
    for name, (token, kind, status) in _refusals(controller_key, other_key).items():
        with pytest.raises(AuthError) as caught:
            verifier.verify(token, kind)
        assert caught.value.status == status, (name, caught.value.reason)


def test_hs256_is_refused_when_only_the_controller_key_is_configured(controller_key) -> None:
    """Algorithm confusion: the public key is public, so an HS256 token made with it proves nothing."""
    public_pem = _pem_public(controller_key)
    verifier = TokenVerifier(HOST, public_key=public_pem)
    claims = {"exec": exec_payload(), "hostUuid": HOST, "exp": int(time.time()) + 600}
    with pytest.raises(AuthError, match="'HS256' not accepted") as caught:
        verifier.verify(hs256_with_key_bytes(claims, public_pem), "exec")
    assert caught.value.status == 401


def test_rs256_is_refused_when_only_the_local_secret_is_configured(controller_key) -> None:
    verifier = TokenVerifier(HOST, local_secret=SECRET)
    with pytest.raises(AuthError, match="not accepted") as caught:
        verifier.verify(cattle_token(controller_key, "exec", exec_payload()), "exec")
    assert caught.value.status == 401


# -- refusals happen in the handshake --------------------------------------------------------------
class Seen:
    """A test route: records what the server let through, and tells the client its claims."""

    def __init__(self) -> None:
        self.opened: list[Claims] = []

    async def __call__(self, ws, claims: Claims) -> None:
        self.opened.append(claims)
        await ws.send(json.dumps({"kind": claims.kind, "instance": claims.instance}))
        await ws.wait_closed()


@pytest.fixture
async def server(controller_key) -> AsyncIterator[tuple[StreamServer, Seen]]:
    seen = Seen()
    verifier = TokenVerifier(HOST, public_key=_pem_public(controller_key), local_secret=SECRET)

    async def check(instance: str) -> None:
        if instance not in (VM_A, VM_B):
            raise StreamRefused(404, f"no virtual machine {instance} on this host")

    srv = StreamServer("127.0.0.1:0", verifier, {"exec": seen, "logs": seen, "console": seen, "proxy": seen},
                       instance_check=check)
    await srv.start()
    yield srv, seen
    await srv.close()


def url(srv: StreamServer, path: str = "/v1/exec/") -> str:
    return f"ws://127.0.0.1:{srv.port}{path}"


async def test_each_bad_token_gets_its_status_in_the_handshake_and_is_logged(server, controller_key, other_key, caplog) -> None:
    srv, seen = server
    caplog.set_level(logging.DEBUG, logger="herdsman")  # even at DEBUG no token is logged
    for name, (token, _kind, status) in _refusals(controller_key, other_key).items():
        caplog.clear()
        with pytest.raises(StreamDenied) as caught:
            async with open_stream(url(srv), token or None):
                pass
        assert caught.value.status == status, (name, caught.value.reason)
        records = [r for r in caplog.records if r.getMessage() == "stream refused"]
        assert len(records) == 1, name
        assert records[0].status == status and records[0].path == "/v1/exec/"
        assert records[0].remote.startswith("127.0.0.1:") and records[0].reason == caught.value.reason
        if token:
            assert token not in caplog.text  # a token never lands in the log
    assert seen.opened == []


async def test_refused_client_gets_plain_http_and_no_websocket(server) -> None:
    """At the socket: an HTTP 401 with a readable body, no 101, and the connection ends."""
    srv, seen = server
    key = base64.b64encode(b"0123456789abcdef").decode()
    request = (f"GET /v1/exec/?token=nope HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n")
    reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
    writer.write(request.encode())
    response = await asyncio.wait_for(reader.read(), 5)  # until the server closes
    writer.close()
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 401 ")
    assert b"Sec-WebSocket-Accept" not in head and b'WWW-Authenticate: Bearer realm="herdsman"' in head
    assert body.decode().strip() == "malformed token"
    assert seen.opened == []


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER"])
async def test_token_in_an_authorization_header(server, controller_key, scheme) -> None:
    srv, seen = server
    token = cattle_token(controller_key, "exec", exec_payload())
    from websockets.asyncio.client import connect

    async with connect(url(srv), additional_headers={"Authorization": f"{scheme} {token}"}) as ws:
        assert json.loads(await ws.recv()) == {"kind": "exec", "instance": VM_A}


async def test_each_kind_opens_only_its_own_path(server, controller_key) -> None:
    srv, seen = server
    paths = {"console": "/v1/console/", "exec": "/v1/exec/", "logs": "/v1/logs/", "proxy": "/v1/container-proxy/"}
    payloads = {"console": {"container": VM_A}, "exec": exec_payload(), "logs": {"Container": VM_A},
                "proxy": {"Container": VM_A, "port": 80}}
    for kind, payload in payloads.items():
        token = cattle_token(controller_key, kind, payload)
        for other, path in paths.items():
            if other == kind:
                async with open_stream(url(srv, path), token) as ws:
                    assert json.loads(await ws.recv())["kind"] == kind
            else:
                with pytest.raises(StreamDenied) as caught:
                    async with open_stream(url(srv, path), token):
                        pass
                assert caught.value.status == 403 and f"not {other}" in caught.value.reason
    assert [c.kind for c in seen.opened] == list(payloads)


async def test_exec_token_for_vm_a_cannot_open_vm_b(server, controller_key) -> None:
    srv, seen = server
    token = cattle_token(controller_key, "exec", exec_payload(VM_A))
    with pytest.raises(StreamDenied) as caught:
        async with open_stream(url(srv, f"/v1/exec/{VM_B}"), token):
            pass
    assert caught.value.status == 403 and VM_A in caught.value.reason and VM_B in caught.value.reason
    async with open_stream(url(srv, f"/v1/exec/{VM_A}"), token) as ws:
        assert json.loads(await ws.recv()) == {"kind": "exec", "instance": VM_A}
    assert [c.instance for c in seen.opened] == [VM_A]


async def test_unknown_path_and_unknown_vm_are_404(server, controller_key) -> None:
    srv, seen = server
    token = cattle_token(controller_key, "exec", exec_payload())
    with pytest.raises(StreamDenied) as caught:
        async with open_stream(url(srv, "/v1/stats/"), token):
            pass
    assert caught.value.status == 404 and "/v1/exec/" in caught.value.reason
    elsewhere = cattle_token(controller_key, "exec", exec_payload(str(uuid.uuid4())))
    with pytest.raises(StreamDenied) as caught:
        async with open_stream(url(srv), elsewhere):
            pass
    assert caught.value.status == 404 and "no virtual machine" in caught.value.reason
    assert seen.opened == []


async def test_a_refused_handshake_never_reaches_a_handler_even_when_many_try(server, controller_key) -> None:
    srv, seen = server
    bad = cattle_token(controller_key, "exec", exec_payload(), exp_in=-3600)

    async def attempt() -> int:
        try:
            async with open_stream(url(srv), bad):
                return 101
        except StreamDenied as exc:
            return exc.status

    assert set(await asyncio.gather(*(attempt() for _ in range(20)))) == {401}
    assert seen.opened == []
