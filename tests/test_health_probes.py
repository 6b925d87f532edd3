"""HAProxy-style request lines and the probes themselves, against real local sockets."""

from __future__ import annotations

import asyncio
import os
import time

import pytest

from agent.health.poller import poller_of
from agent.health.probes import ProbeResult, probe, start_probe, status_result
from agent.health.request_line import HttpCheck, RequestLineError, parse_request_line, tokenize

from tests.health_target import Answer, Blackhole, CheckTarget, closed_port

pytestmark = pytest.mark.timeout(30)


# -- request lines -----------------------------------------------------------------------------

@pytest.mark.parametrize(("line", "wire"), [
    ("GET /healthz HTTP/1.0", b"GET /healthz HTTP/1.0\r\n\r\n"),
    ("GET /healthz HTTP/1.1", b"GET /healthz HTTP/1.1\r\n\r\n"),
    ("GET /healthz", b"GET /healthz HTTP/1.0\r\n\r\n"),
    ("/healthz", b"OPTIONS /healthz HTTP/1.0\r\n\r\n"),
    ("HEAD / HTTP/1.0", b"HEAD / HTTP/1.0\r\n\r\n"),
    ("OPTIONS * HTTP/1.0", b"OPTIONS * HTTP/1.0\r\n\r\n"),
    ("  GET \t /a?b=c&d=%20  ", b"GET /a?b=c&d=%20 HTTP/1.0\r\n\r\n"),
    ('GET "/healthz" "HTTP/1.1\\r\\nHost: example.com"', b"GET /healthz HTTP/1.1\r\nHost: example.com\r\n\r\n"),
    ('GET "/" "HTTP/1.1\\r\\nHost: a\\r\\nUser-Agent: check 1.0"',
     b"GET / HTTP/1.1\r\nHost: a\r\nUser-Agent: check 1.0\r\n\r\n"),
    ("GET /x HTTP/1.1\\r\\nHost:\\ a", b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n"),
    ("POST '/a\\b'", b"POST /a\\b HTTP/1.0\r\n\r\n"),
    ('GET "/with\\x23hash"', b"GET /with#hash HTTP/1.0\r\n\r\n"),
    ("DELETE /", b"DELETE / HTTP/1.0\r\n\r\n"),
])
def test_request_lines_become_the_request_haproxy_sends(line: str, wire: bytes) -> None:
    assert parse_request_line(line).request() == wire


def test_quoted_form_parts() -> None:
    check = parse_request_line('GET "/healthz" "HTTP/1.1\\r\\nHost: example.com"')
    assert check == HttpCheck("GET", "/healthz", "HTTP/1.1", ("Host: example.com",))


@pytest.mark.parametrize(("line", "reason"), [
    ("   ", "is blank"),
    ("GET / HTTP/1.0 extra", "has 4 words"),
    ("G(T /", "is not an HTTP method"),
    ("GET healthz", "must start with '/'"),
    ("GET /a\\x01b", "must start with '/' and hold no spaces or control characters"),
    ("GET / HTTP/2", "must be HTTP/1.0 or HTTP/1.1"),
    ("GET / HTTP/1.1\\r\\n", "header line '' must be 'Name: value'"),
    ("GET / HTTP/1.1\\nHost:a", "must be HTTP/1.0 or HTTP/1.1"),
    ('GET / "HTTP/1.1\\r\\nHost a"', "header line 'Host a'"),
    ('GET / "HTTP/1.1\\r\\nHost: a\\rb"', "header line 'Host: a\\rb'"),
    ('GET "/a', 'unterminated " quote'),
    ("GET /a#b", "unquoted '#'"),
    ("GET /a\\", "lone backslash"),
    ("GET /a\\q", "unknown escape \\q"),
    ("GET /a\\x4", "two hex digits"),
    ("GET /\x00", "control character"),
    ("GET /" + "a" * 3000, "longer than 2048"),
])
def test_bad_request_lines_are_refused_with_the_reason(line: str, reason: str) -> None:
    with pytest.raises(RequestLineError, match=None) as caught:
        parse_request_line(line)
    assert reason in str(caught.value)


def test_single_quotes_are_literal_and_double_quotes_expand() -> None:
    assert tokenize("'a\\r' \"a\\r\"") == ["a\\r", "a\r"]
    assert tokenize('GET "" x') == ["GET", "", "x"]


def test_the_spec_accepts_both_forms() -> None:
    """(Refusals are in test_spec_invalid, with the field path.)"""
    from agent.spec.policies import InstanceHealthCheck

    for line in ("GET /healthz HTTP/1.0", 'GET "/healthz" "HTTP/1.1\\r\\nHost: example.com"', "", None):
        check = InstanceHealthCheck.model_validate({"port": 80, "requestLine": line})
        assert check.request_line == line


# -- status lines ------------------------------------------------------------------------------

@pytest.mark.parametrize(("head", "ok", "detail"), [
    (b"HTTP/1.0 200 OK\r\n", True, "HTTP 200"),
    (b"HTTP/1.1 204 No Content\r\n", True, "HTTP 204"),
    (b"HTTP/1.1 301 Moved\r\n", True, "HTTP 301"),
    (b"HTTP/1.1 399\r\n", True, "HTTP 399"),
    (b"HTTP/1.1 400 Bad Request\r\n", False, "HTTP 400"),
    (b"HTTP/1.0 404 Not Found\n", False, "HTTP 404"),
    (b"HTTP/1.1 503 Unavailable\r\n", False, "HTTP 503"),
    (b"HTTP/1.1 199 Odd\r\n", False, "HTTP 199"),
    (b"SSH-2.0-OpenSSH_9.2\r\n", False, "not an HTTP status line"),
    (b"HTTP/1.1 2000 OK\r\n", False, "not an HTTP status line"),
])
def test_status_lines(head: bytes, ok: bool, detail: str) -> None:
    result = status_result(head)
    assert result.ok is ok and detail in result.detail


# -- probes on real sockets --------------------------------------------------------------------

async def test_tcp_probe_passes_on_a_listener_and_fails_on_a_closed_port() -> None:
    target = await CheckTarget().start()
    try:
        assert await probe(*target.address) == ProbeResult(True, "connected")
        assert target.requests == [], "a TCP check sends nothing"
    finally:
        await target.stop()
    refused = await probe("127.0.0.1", closed_port())
    assert not refused.ok and "refused" in refused.detail and not refused.local


async def test_tcp_probe_times_out_when_the_handshake_never_completes() -> None:
    hole = Blackhole()
    try:
        started = time.monotonic()
        result = await probe("127.0.0.1", hole.port, timeout=0.3)
        elapsed = time.monotonic() - started
    finally:
        hole.close()
    assert not result.ok and result.detail == "connect timed out after 0.3 s"
    assert 0.25 <= elapsed < 1.5


@pytest.mark.parametrize(("answer", "ok", "detail"), [
    (Answer(200), True, "HTTP 200"),
    (Answer(302), True, "HTTP 302"),
    (Answer(200, split=True), True, "HTTP 200"),
    (Answer(404), False, "HTTP 404"),
    (Answer(500), False, "HTTP 500"),
    (Answer(raw=b"garbage\r\n"), False, "not an HTTP status line"),
    (Answer(raw=b""), False, "connection closed before a status line"),
    (Answer(close_at_once=True), False, ""),
])
async def test_http_probe_sends_the_request_and_judges_the_status(answer: Answer, ok: bool, detail: str) -> None:
    target = await CheckTarget(answer=answer).start()
    request = parse_request_line('GET "/healthz" "HTTP/1.1\\r\\nHost: example.com"').request()
    try:
        result = await probe(*target.address, request=request, timeout=2.0)
    finally:
        await target.stop()
    assert result.ok is ok, result
    assert detail in result.detail
    if not answer.close_at_once:
        assert target.requests == [b"GET /healthz HTTP/1.1\r\nHost: example.com\r\n\r\n"]


async def test_http_probe_times_out_on_a_silent_server() -> None:
    target = await CheckTarget(answer=Answer(status=None)).start()
    try:
        result = await probe(*target.address, request=b"GET / HTTP/1.0\r\n\r\n", timeout=0.3)
    finally:
        await target.stop()
    assert result == ProbeResult(False, "no response after 0.3 s")


async def test_a_name_is_refused_without_a_dns_lookup() -> None:
    result = await probe("localhost", 80)
    assert not result.ok and result.local and "not an IP address" in result.detail


async def test_ipv6_loopback() -> None:
    target = await CheckTarget(host="::1").start()
    try:
        assert (await probe(*target.address)).ok
    finally:
        await target.stop()


async def test_done_is_never_called_from_inside_start_probe_and_exactly_once() -> None:
    loop = asyncio.get_running_loop()
    target = await CheckTarget().start()
    calls: list[ProbeResult] = []
    inside = True
    try:
        for host, port in (target.address, ("127.0.0.1", closed_port()), ("not-an-ip", 1)):
            calls.clear()
            inside = True
            finished = asyncio.Event()

            def done(result: ProbeResult) -> None:
                assert not inside, "done() ran inside start_probe()"
                calls.append(result)
                finished.set()

            start_probe(loop, host, port, None, 1.0, done)
            inside = False
            await asyncio.wait_for(finished.wait(), 5)
            await asyncio.sleep(0.05)
            assert len(calls) == 1
    finally:
        await target.stop()


async def test_cancelled_probes_close_their_sockets() -> None:
    hole = Blackhole()
    loop = asyncio.get_running_loop()
    poller_of(loop)  # the loop's one epoll set, made before counting
    fds_before = len(os.listdir("/proc/self/fd"))
    results: list[ProbeResult] = []
    try:
        probes = [start_probe(loop, "127.0.0.1", hole.port, None, 5.0, results.append) for _ in range(50)]
        assert len(os.listdir("/proc/self/fd")) >= fds_before + 50
        for running in probes:
            running.cancel()
        await asyncio.sleep(0.05)
        task = asyncio.ensure_future(probe("127.0.0.1", hole.port, timeout=5.0))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    finally:
        hole.close()
    assert results == []
    assert len(os.listdir("/proc/self/fd")) <= fds_before
