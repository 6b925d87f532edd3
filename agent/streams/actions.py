"""compute.instance.console / .execute / .logs / .proxy: the agent hands out `{url, token}`.

Two ways a user gets a stream (both end at the same stream server and TokenVerifier):
- the agent mints: the controller forwards the action as one of these events, and the reply is
  a hostAccess-style `{url, token}` with a local HS256 token (5 minutes, this host and VM
  only, the claims Cattle would have put in its own token);
- the controller mints RS256 tokens itself, as Cattle does (cattle-protocol.md §5), and the
  agent verifies them with the controller's public key (--controller-public-key).

The action input is read from `processData` (or `data.<inputType>`) and validated with the
same models as the API (agent/spec/actions.py); the VM must exist on this host.
"""

from __future__ import annotations

import socket
import uuid as uuid_module
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from pydantic import BaseModel, ValidationError

from agent.dispatcher import HandlerError
from agent.handlers.instance_event import instance_uuid, process_data
from agent.protocol.events import Event
from agent.spec.actions import (
    ContainerExec,
    ContainerLogs,
    ContainerProxy,
    InstanceConsoleInput,
)
from agent.spec.errors import SpecError
from agent.streams.auth import LOCAL_TTL_SECONDS, mint_local
from agent.streams.server import PATHS

BaseUrl = Callable[[], str | None]


def host_address(toward: str | None = None) -> str:
    """This host's address on the route to `toward` (the controller), else on the default route.

    A UDP socket's connect() only picks the route and source address; nothing is sent.
    """
    for target in ([toward] if toward else []) + ["192.0.2.1"]:
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
                probe.connect((target, 9))
                return str(probe.getsockname()[0])
        except OSError:
            continue
    return "127.0.0.1"


def default_stream_url(listen_host: str | None, port: int, *, tls: bool, controller_url: str | None) -> str:
    """ws(s)://<address>:<port>: the listen address when it is a specific one, else this host's
    address toward the controller."""
    host = listen_host if listen_host not in (None, "", "0.0.0.0", "::") else None
    if host is None:
        toward = urlsplit(controller_url).hostname if controller_url else None
        try:
            host = host_address(socket.gethostbyname(toward) if toward else None)
        except OSError:
            host = host_address()
    if ":" in host:
        host = f"[{host}]"
    return f"{'wss' if tls else 'ws'}://{host}:{port}"


def _input(event: Event, model: type[BaseModel], key: str) -> Any:
    raw: Any = process_data(event)
    if not raw:
        data = event.data or {}
        raw = data.get(key) if isinstance(data.get(key), dict) else {}
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise SpecError.from_validation(exc, "processData") from None


class StreamActions:
    def __init__(self, driver: Any, *, host_uuid: str, secret: bytes, base_url: BaseUrl,
                 ttl: float = LOCAL_TTL_SECONDS) -> None:
        self.driver = driver
        self.host_uuid = host_uuid
        self._secret = secret
        self._base_url = base_url
        self.ttl = ttl

    async def _grant(self, event: Event, kind: str, payload: dict[str, Any]) -> dict[str, Any]:
        base = self._base_url()
        if not base:
            raise HandlerError("the stream server is not running on this host; see the agent's log")
        uuid = payload.get("Container") or payload["container"]
        await self.driver.require_vm(uuid)  # NotFound: no token for a VM that is not here
        token = mint_local(self._secret, self.host_uuid, kind, payload, self.ttl, subject=f"event:{event.id}")
        return {"url": base.rstrip("/") + PATHS[kind], "token": token}

    @staticmethod
    def _uuid(event: Event) -> str:
        value = instance_uuid(event)
        try:
            return str(uuid_module.UUID(value))
        except ValueError:
            raise HandlerError(f"data.instanceHostMap.instance.uuid: {value!r} is not a uuid") from None

    async def console(self, event: Event) -> dict[str, Any]:
        spec: InstanceConsoleInput = _input(event, InstanceConsoleInput, "instanceConsoleInput")
        payload: dict[str, Any] = {"container": self._uuid(event)}
        if spec.kind == "vnc":
            payload["kind"] = "vnc"
        reply = await self._grant(event, "console", payload)
        return {"kind": spec.kind, **reply}

    async def execute(self, event: Event) -> dict[str, Any]:
        spec: ContainerExec = _input(event, ContainerExec, "containerExec")
        return await self._grant(event, "exec", {"AttachStdin": spec.attach_stdin, "AttachStdout": spec.attach_stdout,
                                           "Tty": spec.tty, "Cmd": list(spec.command), "Container": self._uuid(event)})

    async def logs(self, event: Event) -> dict[str, Any]:
        spec: ContainerLogs = _input(event, ContainerLogs, "containerLogs")
        return await self._grant(event, "logs", {"Container": self._uuid(event), "Lines": spec.lines, "Follow": spec.follow})

    async def proxy(self, event: Event) -> dict[str, Any]:
        spec: ContainerProxy = _input(event, ContainerProxy, "containerProxy")
        return await self._grant(event, "proxy", {"Container": self._uuid(event), "port": spec.port, "scheme": spec.scheme})
