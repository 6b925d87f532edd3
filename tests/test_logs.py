"""Log output as a log shipper (json) and a person (text) read it."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from agent.logs import configure_logging

ROOT = Path(__file__).resolve().parent.parent
RFC3339_MS_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z\Z")
log = logging.getLogger("agent.test")


@pytest.fixture(autouse=True)
def restore_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in root.handlers[:]:
        if handler not in handlers:
            root.removeHandler(handler)
            handler.close()
    root.setLevel(level)


def _json_lines(buf: io.StringIO) -> list[dict]:
    lines = buf.getvalue().split("\n")
    assert lines[-1] == ""
    return [json.loads(line) for line in lines[:-1]]


def test_json_record_fields_and_extras() -> None:
    buf = io.StringIO()
    configure_logging("json", stream=buf)
    before = time.time()
    log.info(
        "VM %s started", "web-1", extra={"instance": "c0ffee", "vcpu": 2, "labels": {"a": "b"}}
    )
    (record,) = _json_lines(buf)
    assert record == {
        "ts": record["ts"],
        "level": "INFO",
        "logger": "agent.test",
        "msg": "VM web-1 started",
        "instance": "c0ffee",
        "vcpu": 2,
        "labels": {"a": "b"},
    }
    assert RFC3339_MS_UTC.match(record["ts"])
    stamp = datetime.strptime(record["ts"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    assert abs(stamp.timestamp() - before) < 2


def test_json_unserialisable_values_become_strings() -> None:
    class Thing:
        def __str__(self) -> str:
            return "a thing"

    class Broken:
        def __str__(self) -> str:
            raise RuntimeError("no")

    buf = io.StringIO()
    configure_logging("json", stream=buf)
    log.warning(
        "odd values",
        extra={
            "thing": Thing(),
            "path": Path("/var/lib/herdsman"),
            "nan": float("nan"),
            "ids": (1, 2),
            "tags": {"x"},
            "broken": Broken(),
            "ts": "mine",
        },
    )
    (record,) = _json_lines(buf)
    assert record["thing"] == "a thing"
    assert record["path"] == "/var/lib/herdsman"
    assert record["nan"] == "nan"  # NaN is not JSON
    assert record["ids"] == [1, 2]
    assert record["tags"] == "{'x'}"
    assert record["broken"] == "<unprintable Broken>"
    assert record["ts_"] == "mine" and RFC3339_MS_UTC.match(record["ts"])  # core field kept


def test_json_multiline_message_and_exception_stay_one_line() -> None:
    buf = io.StringIO()
    configure_logging("json", stream=buf)
    try:
        {}["missing"]
    except KeyError:
        log.exception("handler failed\nfor event %s", "e-1\u2028x", extra={"event": "e-1"})
    (record,) = _json_lines(buf)  # exactly one line for one record
    assert buf.getvalue().isascii()
    assert record["msg"] == "handler failed\nfor event e-1\u2028x"
    assert record["level"] == "ERROR" and record["event"] == "e-1"
    assert record["exc"].startswith("Traceback (most recent call last):")
    assert "test_json_multiline_message_and_exception_stay_one_line" in record["exc"]
    assert record["exc"].endswith("KeyError: 'missing'")


def test_level_threshold_and_reconfiguration() -> None:
    foreign = logging.StreamHandler(io.StringIO())
    logging.getLogger().addHandler(foreign)
    first, second = io.StringIO(), io.StringIO()
    configure_logging("json", level="WARNING", stream=first)
    log.info("dropped")
    log.warning("kept")
    configure_logging("text", level="debug", stream=second)
    log.debug("debug now shown")
    assert [r["msg"] for r in _json_lines(first)] == ["kept"]
    assert "debug now shown" in second.getvalue()
    assert foreign in logging.getLogger().handlers  # others' handlers are left alone
    ours = [h for h in logging.getLogger().handlers if h.get_name() == "herdsman"]
    assert len(ours) == 1
    with pytest.raises(ValueError):
        configure_logging("yaml", stream=second)  # type: ignore[arg-type]


def test_text_line_with_extras() -> None:
    buf = io.StringIO()
    configure_logging("text", stream=buf)
    log.info(
        "VM started",
        extra={"instance": "c0ffee", "vm": "web 1", "quote": 'say "hi"', "empty": "", "vcpu": 2},
    )
    line = buf.getvalue()
    assert line.endswith("\n") and line.count("\n") == 1
    match = re.match(r"(\S+) INFO    agent\.test: VM started (.*)\n\Z", line)
    assert match, line
    assert RFC3339_MS_UTC.match(match.group(1))
    assert match.group(2) == 'instance=c0ffee vm="web 1" quote="say \\"hi\\"" empty="" vcpu=2'


def test_text_escapes_what_would_forge_a_line() -> None:
    buf = io.StringIO()
    configure_logging("text", stream=buf)
    log.warning("user said: hi\n2024-01-01T00:00:00.000Z ERROR agent: fake", extra={"v": "a\nb"})
    out = buf.getvalue()
    assert out.count("\n") == 1
    assert "hi\\n2024-01-01" in out and 'v="a\\nb"' in out


def test_text_exception_follows_indented() -> None:
    buf = io.StringIO()
    configure_logging("text", stream=buf)

    def divide(a: int, b: int) -> float:
        return a / b

    try:
        divide(1, 0)
    except ZeroDivisionError:
        log.error("pinging failed", exc_info=True, extra={"attempt": 3})
    first, *trace = buf.getvalue().rstrip("\n").split("\n")
    assert first.endswith("ERROR   agent.test: pinging failed attempt=3")
    assert trace[0] == "    Traceback (most recent call last):"
    assert trace[-1] == "    ZeroDivisionError: division by zero"
    assert all(t.startswith("    ") for t in trace)


def test_journal_priority_prefix_only_on_the_journal_stream(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """systemd names the journal's stdout connection in JOURNAL_STREAM (device:inode);
    journald turns a leading <N> into the record's priority."""
    with open(tmp_path / "journal", "w") as journal, open(tmp_path / "other", "w") as other:
        st = os.fstat(journal.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        configure_logging("json", stream=journal)
        log.warning("disk almost full")
        log.error("two\nlines")
        configure_logging("text", stream=other)  # inherited variable, different stream
        log.warning("plain")
    lines = (tmp_path / "journal").read_text().splitlines()
    assert [line[:3] for line in lines] == ["<4>", "<3>"]
    assert json.loads(lines[0][3:])["msg"] == "disk almost full"
    assert not (tmp_path / "other").read_text().startswith("<")


def test_auto_is_text_without_timestamp_on_the_journal_and_json_elsewhere(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """journald stamps and prioritises each line: there, a person reads `journalctl -u`."""
    with open(tmp_path / "journal", "w") as journal, open(tmp_path / "file", "w") as other:
        st = os.fstat(journal.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        configure_logging("auto", stream=journal)
        log.info("agent starting", extra={"hostUuid": "h-1"})
        log.error("event failed", extra={"error": "no such VM"})
        configure_logging("auto", stream=other)
        log.info("agent starting")
    assert (tmp_path / "journal").read_text().splitlines() == [
        f"<6>INFO    {log.name}: agent starting hostUuid=h-1",
        f'<3>ERROR   {log.name}: event failed error="no such VM"',
    ]
    assert json.loads((tmp_path / "file").read_text())["msg"] == "agent starting"


def test_defaults_to_the_process_stdout() -> None:
    code = (
        "import logging\nfrom agent.logs import configure_logging\n"
        "configure_logging('json')\n"
        "logging.getLogger('agent.main').info('up', extra={'pid': 1})\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, timeout=60
    )
    assert out.returncode == 0, out.stderr
    record = json.loads(out.stdout)
    assert (record["logger"], record["msg"], record["pid"]) == ("agent.main", "up", 1)
    assert out.stderr == ""
