"""Stream tokens: verify the JWTs that open console, exec, logs and proxy streams; mint local ones.

Cattle hands the user a `hostAccess {url, token}` whose token is an RS256 JWT signed with the
controller's key; its claims are the action's payload under the kind's name (`{"exec": {...}}`),
`hostUuid`, `exp`, `iat`, `sub` (cattle-protocol.md §5). When the agent answers the action
events itself (and in the local debug mode) it mints HS256 tokens with a secret that never
leaves the host. PyJWT does the signature work: it is the maintained JWT library for Python,
checks `exp`/`iat` with a leeway, and refuses to use an asymmetric key as an HMAC secret.

What this module adds on top:
- the algorithm follows the KEY, never the token: RS256 only against the controller's public
  key, HS256 only against the local secret; `none` and everything else are refused, so an
  HS256 token "signed" with the public key (algorithm confusion) cannot pass;
- the token must be for this host (`hostUuid`) and carry the object of the kind being opened,
  naming a container that is a uuid (it becomes a libvirt lookup and a log path).
"""

from __future__ import annotations

import time
import uuid as uuid_module
from dataclasses import dataclass
from typing import Any, Literal, cast, get_args

import jwt
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key

Kind = Literal["console", "exec", "logs", "proxy"]
KINDS: tuple[str, ...] = get_args(Kind)
#: Seconds of clock skew tolerated between the controller and this host.
LEEWAY_SECONDS = 30
#: Local tokens are short-lived: they are used once, right after the action replies.
LOCAL_TTL_SECONDS = 300
LOCAL_ISSUER = "herdsman"


@dataclass(frozen=True)
class Claims:
    kind: Kind
    #: instance uuid of the target VM (= Cattle externalId = libvirt domain uuid), canonical form
    instance: str
    #: the kind's object from the token, e.g. logs: {"Container", "Lines", "Follow"}
    payload: dict[str, Any]
    subject: str | None
    #: epoch seconds
    expires: float


class AuthError(Exception):
    """A refused token: 401 when it proves nothing (missing, forged, expired), 403 when it is
    genuine but not for this host, instance or kind."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def load_public_key(data: bytes) -> RSAPublicKey:
    """The controller's RSA public key from PEM: a public key (SPKI or PKCS#1) or an X.509
    certificate, which is what Cattle publishes (api.crt)."""
    try:
        if b"-----BEGIN CERTIFICATE-----" in data:
            key: object = x509.load_pem_x509_certificate(data).public_key()
        else:
            key = load_pem_public_key(data)
    except ValueError as exc:
        raise ValueError(f"not a PEM public key or certificate: {exc}") from None
    if not isinstance(key, RSAPublicKey):
        raise ValueError(f"the controller key must be RSA (RS256), not {type(key).__name__}")
    return key


def container_of(kind: str, payload: dict[str, Any]) -> str:
    """The instance a kind's object names: `Container` (exec, logs, proxy) or `container` (console)."""
    value = payload.get("Container", payload.get("container"))
    if not isinstance(value, str) or not value:
        raise AuthError(403, f"token's {kind} object names no container")
    try:
        return str(uuid_module.UUID(value))
    except ValueError:
        raise AuthError(403, f"token's {kind} container is not an instance uuid") from None


class TokenVerifier:
    def __init__(self, host_uuid: str, *, public_key: bytes | None = None, local_secret: bytes | None = None) -> None:
        self.host_uuid = str(uuid_module.UUID(host_uuid))
        self._local_secret = local_secret or None
        self._public_key: RSAPublicKey | None = None
        if public_key is not None:
            self.set_public_key(public_key)

    def set_public_key(self, pem: bytes) -> None:
        """Install (or replace) the controller's key, e.g. once it has been fetched."""
        self._public_key = load_public_key(pem)

    @property
    def accepts(self) -> list[str]:
        algorithms = []
        if self._public_key is not None:
            algorithms.append("RS256")
        if self._local_secret is not None:
            algorithms.append("HS256")
        return algorithms

    def verify(self, token: str, kind: str) -> Claims:
        if not token:
            raise AuthError(401, "no token (give ?token= or an Authorization: Bearer header)")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError:
            raise AuthError(401, "malformed token") from None
        algorithm = header.get("alg")
        key: Any
        if algorithm == "RS256" and self._public_key is not None:
            key = self._public_key
        elif algorithm == "HS256" and self._local_secret is not None:
            key = self._local_secret
        else:
            raise AuthError(401, f"token algorithm {algorithm!r} not accepted here (accepted: {', '.join(self.accepts) or 'none configured'})")
        try:
            claims = jwt.decode(token, key, algorithms=[algorithm], leeway=LEEWAY_SECONDS,
                                options={"require": ["exp"], "verify_aud": False})
        except jwt.ExpiredSignatureError:
            raise AuthError(401, "token expired") from None
        except jwt.InvalidSignatureError:
            raise AuthError(401, "token signature does not verify") from None
        except jwt.InvalidTokenError as exc:
            raise AuthError(401, f"invalid token: {exc}") from None
        host = claims.get("hostUuid")
        if host != self.host_uuid:
            raise AuthError(403, f"token is for host {host!r}, not this host")
        payload = claims.get(kind)
        if not isinstance(payload, dict):
            granted = [k for k in KINDS if isinstance(claims.get(k), dict)]
            raise AuthError(403, f"token grants {', '.join(granted) or 'no stream'}, not {kind}")
        subject = claims.get("sub")
        return Claims(kind=cast(Kind, kind), instance=container_of(kind, payload), payload=dict(payload),
                      subject=subject if isinstance(subject, str) else None, expires=float(claims["exp"]))


def mint_local(secret: bytes, host_uuid: str, kind: str, payload: dict[str, Any], ttl: float = LOCAL_TTL_SECONDS,
               *, subject: str | None = None) -> str:
    """An HS256 token the local TokenVerifier accepts: the same claims Cattle puts in its RS256 ones."""
    if kind not in KINDS:
        raise ValueError(f"unknown stream kind {kind!r}")
    now = int(time.time())
    claims: dict[str, Any] = {kind: payload, "hostUuid": str(uuid_module.UUID(host_uuid)), "iat": now,
                              "exp": now + int(ttl), "iss": LOCAL_ISSUER}
    if subject:
        claims["sub"] = subject
    return jwt.encode(claims, secret, algorithm="HS256")


async def read_public_key(source: str, *, timeout: float = 10.0) -> bytes:
    """The controller key's PEM from a file path, or from an http(s) URL such as
    {CATTLE_URL}/scripts/api.crt; checked before it is returned."""
    if source.startswith(("http://", "https://")):
        import httpx

        async with httpx.AsyncClient(timeout=timeout, follow_redirects=True) as client:
            response = await client.get(source)
            response.raise_for_status()
            data = response.content
    else:
        with open(source, "rb") as f:
            data = f.read(1 << 20)
    load_public_key(data)
    return data
