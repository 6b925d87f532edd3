"""The event envelope: parsing frames and the layout of replies (cattle-protocol.md §2)."""

from __future__ import annotations

import json
import re
import time
import uuid

import pytest

from agent.protocol.events import (
    Event,
    FrameError,
    make_error_reply,
    make_progress_reply,
    make_reply,
    parse_frame,
)

# The real request of cattle-protocol.md §2 (python-agent tests/docker/instance_remove), trimmed.
REMOVE_REQUEST = {
    "id": "d2f9acc5-8c58-4232-8647-bab050e3396c", "name": "compute.instance.remove",
    "replyTo": "reply.3988693145729591781", "resourceId": "1ihm3",
    "resourceType": "instanceHostMap", "previousIds": None, "previousNames": None,
    "time": 1431190426093, "timeoutMillis": 15000, "transitioningProgress": None,
    "data": {"instanceHostMap": {"id": 3, "state": "removing",
                                 "instance": {"uuid": "c861f990", "kind": "container"}}},
    "context": {"processName": "instancehostmap.remove"},
}
LIMIT = 1 << 20


def parse(obj: object) -> Event:
    return parse_frame(json.dumps(obj), max_bytes=LIMIT)


def test_real_request_parses_with_unknown_fields_kept() -> None:
    event = parse({**REMOVE_REQUEST, "somethingNew": 1})
    assert event.name == event.base_name == "compute.instance.remove"
    assert event.resource_key == "instanceHostMap:1ihm3"
    assert event.data["instanceHostMap"]["state"] == "removing"
    assert event.model_extra == {"somethingNew": 1}


def test_qualified_name_and_missing_resource() -> None:
    event = parse({"name": "compute.instance.activate;agent=91"})
    assert event.base_name == "compute.instance.activate"
    assert event.resource_key is None and event.replyTo is None


def test_bytes_frames_parse_like_text() -> None:
    frame = json.dumps(REMOVE_REQUEST).encode()
    assert parse_frame(frame, max_bytes=LIMIT).id == REMOVE_REQUEST["id"]


def test_reply_layout_follows_cattle() -> None:
    request = parse({**REMOVE_REQUEST, "previousIds": ["older"], "previousNames": ["outer"]})
    before = int(time.time() * 1000)
    reply = make_reply(request, {"instance": {"externalId": "abc"}})
    assert reply["name"] == "reply.3988693145729591781"
    assert reply["previousIds"] == ["d2f9acc5-8c58-4232-8647-bab050e3396c", "older"]
    assert reply["previousNames"] == ["compute.instance.remove", "outer"]
    assert (reply["resourceType"], reply["resourceId"]) == ("instanceHostMap", "1ihm3")
    assert reply["data"] == {"instanceHostMap": {"instance": {"externalId": "abc"}}}
    assert uuid.UUID(reply["id"]) and reply["id"] != request.id
    assert before <= reply["time"] <= int(time.time() * 1000)
    assert reply.get("transitioning") is None
    json.dumps(reply)  # publishable as is


def test_reply_without_resource_type_or_data() -> None:
    request = parse({"id": "1", "name": "compute.instance.inspect", "replyTo": "reply.1"})
    assert make_reply(request, {"a": 1})["data"] == {"a": 1}
    assert make_reply(parse(REMOVE_REQUEST))["data"] == {}


def test_ping_reply_data_is_not_wrapped() -> None:
    ping = parse({"id": "p", "name": "ping", "replyTo": "ping.reply", "resourceType": "agent",
                  "resourceId": "2", "data": {"options": {"instances": True}}})
    data = {"resources": [], "options": {"instances": True}}
    assert make_reply(ping, data)["data"] == data
    assert make_reply(ping, data, keyed=True)["data"] == {"agent": data}


def test_error_reply_sets_both_messages() -> None:
    reply = make_error_reply(parse(REMOVE_REQUEST), "disk full", "OSError: [Errno 28]")
    assert reply["transitioning"] == "error"
    assert reply["transitioningMessage"] == "disk full"
    assert reply["transitioningInternalMessage"] == "OSError: [Errno 28]"
    assert reply["name"] == REMOVE_REQUEST["replyTo"]
    assert reply["previousIds"][0] == REMOVE_REQUEST["id"]
    assert make_error_reply(parse(REMOVE_REQUEST), "boom")["transitioningInternalMessage"] == "boom"


def test_error_reply_never_names_a_java_class() -> None:
    reply = make_error_reply(parse(REMOVE_REQUEST), "class:java.lang.Runtime")
    assert not reply["transitioningInternalMessage"].startswith("class:")
    long_reply = make_error_reply(parse(REMOVE_REQUEST), "x" * 100_000)
    assert len(long_reply["transitioningMessage"]) <= 1024


def test_progress_reply() -> None:
    reply = make_progress_reply(parse(REMOVE_REQUEST), 140, "downloading")
    assert reply["transitioning"] == "yes"
    assert reply["transitioningProgress"] == 100
    assert reply["transitioningMessage"] == "downloading"
    assert reply["previousIds"][0] == REMOVE_REQUEST["id"]


def test_fire_and_forget_event_cannot_be_answered() -> None:
    with pytest.raises(ValueError, match="no replyTo"):
        make_reply(parse({"name": "compute.instance.force.stop"}))


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        ("{not json", "not JSON"),
        ("", "not JSON"),
        ('{"name": NaN}', "not JSON"),
        ("[1, 2]", "not a JSON object but an array"),
        ('"ping"', "not a JSON object but a string"),
        ('{"id": "1"}', "name: Field required"),
        ('{"name": ""}', "name: String should have at least 1 character"),
        ('{"name": 5}', "name: Input should be a valid string"),
        ('{"name": "x", "data": []}', "data: Input should be a valid dictionary"),
        ('{"name": "x", "previousIds": ["a", 3]}', "previousIds.1: Input should be a valid string"),
        ('{"name": "x", "time": "soon"}', "time: Input should be a valid integer"),
        (b'{"name": "\xff"}', "not valid UTF-8"),
        ("[" * 100_000, "not JSON"),
    ],
)
def test_bad_frames_say_what_is_wrong(frame: str | bytes, message: str) -> None:
    with pytest.raises(FrameError, match=re.escape(message)):
        parse_frame(frame, max_bytes=LIMIT)


def test_invalid_event_still_yields_its_reply_address() -> None:
    with pytest.raises(FrameError) as info:
        parse({**REMOVE_REQUEST, "data": "oops"})
    assert info.value.reply_to == REMOVE_REQUEST["replyTo"]
    assert info.value.event_id == REMOVE_REQUEST["id"]
    reply = make_error_reply(info.value.as_request(), str(info.value))
    assert reply["name"] == REMOVE_REQUEST["replyTo"]
    assert reply["previousIds"] == [REMOVE_REQUEST["id"]]
    assert reply["resourceId"] == "1ihm3" and "data" in reply["transitioningMessage"]


def test_oversize_frame_recovers_reply_address_cheaply() -> None:
    frame = json.dumps({**REMOVE_REQUEST, "data": {"blob": "x" * (10 << 20)}})
    started = time.perf_counter()
    with pytest.raises(FrameError, match=r"too large: 10\d{6} bytes, limit 1048576 bytes") as info:
        parse_frame(frame, max_bytes=LIMIT)
    assert time.perf_counter() - started < 0.5
    assert info.value.reply_to == REMOVE_REQUEST["replyTo"]
    assert info.value.event_id == REMOVE_REQUEST["id"]
    assert info.value.as_request().resourceType == "instanceHostMap"


def test_header_of_a_nested_event_is_not_taken_for_the_request() -> None:
    inner = {"id": "inner", "name": "x", "replyTo": "reply.inner"}
    frame = json.dumps({"data": {"event": inner}, "name": "delegate.request",
                        "pad": "y" * LIMIT})
    with pytest.raises(FrameError) as info:
        parse_frame(frame, max_bytes=LIMIT)
    assert info.value.reply_to is None and info.value.as_request() is None


def test_truncated_frame_recovers_what_was_read_cleanly() -> None:
    frame = json.dumps(REMOVE_REQUEST)[:300]
    with pytest.raises(FrameError, match="not JSON") as info:
        parse_frame(frame, max_bytes=LIMIT)
    assert info.value.reply_to == REMOVE_REQUEST["replyTo"]
