"""The Cattle event envelope: parsing request frames and building replies.

Pure functions only (no I/O), so every rule of cattle-protocol.md §2 can be tested on its own.
A request the agent cannot parse should still get an error reply when its `replyTo` can be
found: Cattle otherwise waits for its full call timeout and then re-sends the same event.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from typing import Any

import pydantic

__all__ = [
    "Event",
    "FrameError",
    "make_error_reply",
    "make_progress_reply",
    "make_reply",
    "parse_frame",
]

# Only this much of an unusable frame is scanned for its header fields. Cattle (Jackson,
# EventVO) writes id/name/replyTo/resource* before `data`, so they sit in the first bytes.
_SCAN_LIMIT = 64 * 1024
# A recovered header value longer than this is not trusted (replyTo is "reply.<long>").
_MAX_HEADER_VALUE = 1024
_HEADER_KEYS = ("id", "name", "replyTo", "resourceType", "resourceId")
# Cattle keeps transitioning messages in bounded columns; long tracebacks are cut, not refused.
_MAX_MESSAGE = 1024
_MAX_INTERNAL_MESSAGE = 8192

_WS = re.compile(r"[ \t\n\r]*")
_DECODER = json.JSONDecoder()


class Event(pydantic.BaseModel):
    """One Cattle event (request, reply or keepalive); unknown fields are kept, not refused."""

    model_config = pydantic.ConfigDict(extra="allow")

    id: str | None = None
    name: str = pydantic.Field(min_length=1)
    replyTo: str | None = None
    resourceType: str | None = None
    resourceId: str | None = None
    previousIds: list[str] | None = None
    previousNames: list[str] | None = None
    data: dict[str, Any] | None = None
    time: int | None = None
    timeoutMillis: int | None = None
    transitioning: str | None = None
    transitioningMessage: str | None = None
    transitioningInternalMessage: str | None = None
    transitioningProgress: int | None = None
    context: dict[str, Any] | None = None
    publisher: str | None = None

    @property
    def base_name(self) -> str:
        """The name without a `;agent=N` qualifier (raw-style subscriptions keep it)."""
        return self.name.split(";", 1)[0]

    @property
    def resource_key(self) -> str | None:
        """`type:id` of the resource acted on, for per-resource serialisation of handlers."""
        if self.resourceType and self.resourceId:
            return f"{self.resourceType}:{self.resourceId}"
        return None


class FrameError(ValueError):
    """A frame that is not a usable event.

    When the request's header fields could still be read, `reply_to` (and `event_id`, ...) are
    set, so the caller can answer with an error reply (see `as_request`) instead of leaving the
    controller to time out.
    """

    def __init__(self, message: str, header: dict[str, str] | None = None) -> None:
        super().__init__(message)
        header = header or {}
        self.event_id: str | None = header.get("id")
        self.name: str | None = header.get("name")
        self.reply_to: str | None = header.get("replyTo")
        self.resource_type: str | None = header.get("resourceType")
        self.resource_id: str | None = header.get("resourceId")

    def as_request(self) -> Event | None:
        """A minimal request carrying the recovered header, for `make_error_reply`."""
        if not self.reply_to:
            return None
        return Event.model_construct(
            id=self.event_id,
            name=self.name or "",
            replyTo=self.reply_to,
            resourceType=self.resource_type,
            resourceId=self.resource_id,
        )


def parse_frame(text: str | bytes, *, max_bytes: int) -> Event:
    """Parse one websocket text frame into an `Event`, or raise `FrameError` saying why not."""
    size = _utf8_size(text)
    if size > max_bytes:
        raise FrameError(
            f"frame too large: {size} bytes, limit {max_bytes} bytes", _scan_header(text)
        )
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise FrameError(f"frame is not valid UTF-8: {exc}", _scan_header(text)) from exc
    try:
        obj = json.loads(text, parse_constant=_reject_constant)
    except RecursionError as exc:
        raise FrameError("frame is not JSON: nested too deeply", _scan_header(text)) from exc
    except ValueError as exc:
        raise FrameError(f"frame is not JSON: {exc}", _scan_header(text)) from exc
    if not isinstance(obj, dict):
        raise FrameError(f"frame is not a JSON object but {_json_type(obj)}")
    try:
        return Event.model_validate(obj)
    except pydantic.ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in err['loc']) or '(frame)'}: {err['msg']}"
            for err in exc.errors()
        )
        raise FrameError(f"invalid event: {problems}", _header_of(obj)) from exc


def make_reply(request: Event, data: dict[str, Any] | None = None, *,
               keyed: bool | None = None) -> dict[str, Any]:
    """A success reply to `request`, ready to publish.

    Cattle reads an agent's answer from `reply.data[<request resourceType>]` (§2.1), so `data`
    is wrapped under that key. Ping replies are the exception (§1.5: Cattle reads `resources`
    and `options` straight from `data`); `keyed=None` means "wrap unless this is a ping".
    """
    reply = _reply_base(request)
    if keyed is None:
        keyed = request.base_name != "ping"
    if data is None:
        reply["data"] = {}
    elif keyed and request.resourceType:
        reply["data"] = {request.resourceType: data}
    else:
        reply["data"] = data
    return reply


def make_error_reply(request: Event, message: str, internal: str | None = None) -> dict[str, Any]:
    """A failure reply: Cattle raises it as an EventExecutionException on the process."""
    internal_text = internal if internal is not None else message
    # Cattle instantiates the exception class named by an internal message of the form
    # "class:<FQCN>"; a message that merely looks like that must not pick a Java class.
    if internal_text.startswith("class:"):
        internal_text = "error: " + internal_text
    reply = _reply_base(request)
    reply["data"] = {}
    reply["transitioning"] = "error"
    reply["transitioningMessage"] = _clip(message, _MAX_MESSAGE)
    reply["transitioningInternalMessage"] = _clip(internal_text, _MAX_INTERNAL_MESSAGE)
    return reply


def make_progress_reply(request: Event, percent: int, message: str) -> dict[str, Any]:
    """A progress keepalive (`transitioning: "yes"`); the final reply must still follow."""
    reply = _reply_base(request)
    reply["data"] = {}
    reply["transitioning"] = "yes"
    reply["transitioningMessage"] = _clip(message, _MAX_MESSAGE)
    reply["transitioningProgress"] = max(0, min(100, int(percent)))
    return reply


def _reply_base(request: Event) -> dict[str, Any]:
    if not request.replyTo:
        raise ValueError(f"event {request.name!r} (id {request.id}) has no replyTo to answer")
    previous_ids = [*([request.id] if request.id else []), *(request.previousIds or [])]
    previous_names = [request.name, *(request.previousNames or [])]
    return {
        "id": str(uuid.uuid4()),
        "name": request.replyTo,
        "previousIds": previous_ids,
        "previousNames": previous_names,
        "resourceType": request.resourceType,
        "resourceId": request.resourceId,
        "time": int(time.time() * 1000),
    }


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _utf8_size(text: str | bytes) -> int:
    if isinstance(text, bytes):
        return len(text)
    # ASCII strings (the usual case) need no encoding pass to be measured.
    return len(text) if text.isascii() else len(text.encode("utf-8", errors="surrogatepass"))


def _reject_constant(token: str) -> Any:
    raise ValueError(f"{token} is not valid JSON")


def _json_type(obj: object) -> str:
    names = {list: "an array", str: "a string", bool: "a boolean", int: "a number",
             float: "a number", type(None): "null"}
    return names.get(type(obj), type(obj).__name__)


def _header_of(obj: dict[str, Any]) -> dict[str, str]:
    return {key: value for key in _HEADER_KEYS
            if isinstance(value := obj.get(key), str) and 0 < len(value) <= _MAX_HEADER_VALUE}


def _skip_ws(text: str, pos: int) -> int:
    match = _WS.match(text, pos)
    return match.end() if match else pos


def _scan_header(text: str | bytes) -> dict[str, str]:
    """Read the top-level string header fields from the start of an unusable frame.

    Walks the outermost object member by member with the C JSON scanner over a bounded prefix,
    so nested objects (e.g. an inner event inside `data`) can never be mistaken for the header,
    and a huge or broken frame costs no more than `_SCAN_LIMIT` characters of work.
    """
    if isinstance(text, bytes):
        text = text[:_SCAN_LIMIT].decode("utf-8", errors="ignore")
    else:
        text = text[:_SCAN_LIMIT]
    found: dict[str, Any] = {}
    pos = _skip_ws(text, 0)
    if not text.startswith("{", pos):
        return {}
    pos += 1
    try:
        while True:
            pos = _skip_ws(text, pos)
            if not text.startswith('"', pos):
                break
            key, pos = _DECODER.raw_decode(text, pos)
            pos = _skip_ws(text, pos)
            if not text.startswith(":", pos):
                break
            pos = _skip_ws(text, pos + 1)
            value, pos = _DECODER.raw_decode(text, pos)
            if key in _HEADER_KEYS:
                found[key] = value
            if all(key in found for key in _HEADER_KEYS):
                break
            pos = _skip_ws(text, pos)
            if not text.startswith(",", pos):
                break
            pos += 1
    except (ValueError, RecursionError):
        pass  # the rest is truncated or broken: keep what was read cleanly
    return _header_of(found)
