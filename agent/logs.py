"""Logging setup: one JSON object per line for log shippers, or one readable line for people.

Both formats carry every ``extra=`` key the caller passed, so context such as an instance
uuid or an event id is searchable. Under systemd the journal's priority prefix is added, so
``journalctl -p warning`` filters by level.

``auto`` (the default) picks by where the lines go. Written to the journal (systemd's
JOURNAL_STREAM names our stdout) they are text without a timestamp: journald stamps and
prioritises each line itself, and ``journalctl -u herdsman`` is read by people; a shipper
that wants JSON sets ``json`` and still gets the priorities. Anywhere else (a terminal, a
file, a container's log) they are JSON.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
from typing import Any, Literal, TextIO

LogFormat = Literal["auto", "json", "text"]

# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message",
    "asctime",
    "taskName",
}
_CORE = ("ts", "level", "logger", "msg", "exc", "stack")
_SYSLOG_PRIORITY = {"CRITICAL": 2, "ERROR": 3, "WARNING": 4, "INFO": 6, "DEBUG": 7}
# C0/C1 controls and Unicode line separators: anything some reader takes as a line break.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_BARE = re.compile(r"""[^\s"'=\\\x00-\x1f\x7f-\x9f\u2028\u2029]+\Z""")


def configure_logging(
    fmt: LogFormat, level: str | int = "INFO", stream: TextIO | None = None
) -> logging.Handler:
    """Route the root logger to ``stream`` (sys.stdout at call time) in ``fmt``.

    Calling it again replaces the handler it installed before, and leaves alone handlers
    that others (a test harness, say) attached to the root logger.
    """
    stream = sys.stdout if stream is None else stream
    journal = _is_journal(stream)
    if fmt == "auto":
        fmt = "text" if journal else "json"
    if fmt == "json":
        formatter: logging.Formatter = JsonFormatter()
    elif fmt == "text":
        formatter = TextFormatter(timestamp=not journal)
    else:
        raise ValueError(f"unknown log format {fmt!r}; expected 'auto', 'json' or 'text'")
    if journal:
        formatter = _JournalPriority(formatter)
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    handler.set_name("herdsman")
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == "herdsman"]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    # httpx logs every request at INFO: one line per reply published would drown the agent's own.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    return handler


def extras(record: logging.LogRecord) -> dict[str, Any]:
    """The ``extra=`` keys of a record; one that shadows a core field gets a ``_`` suffix."""
    found = {}
    for key, value in vars(record).items():
        if key not in _STANDARD:
            found[f"{key}_" if key in _CORE else key] = value
    return found


def _timestamp(record: logging.LogRecord) -> str:
    """RFC 3339, UTC, milliseconds: 2024-05-01T12:00:00.123Z."""
    head = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
    return f"{head}.{int(record.msecs):03d}Z"


class JsonFormatter(logging.Formatter):
    """One JSON object per line. ASCII-only output, so no line separator in any value can
    split a record, whatever the reader treats as a line break."""

    def format(self, record: logging.LogRecord) -> str:
        obj: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        obj.update({key: _jsonable(value) for key, value in extras(record).items()})
        if record.exc_info:
            obj["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            obj["exc"] = record.exc_text
        if record.stack_info:
            obj["stack"] = self.formatStack(record.stack_info)
        return json.dumps(obj, ensure_ascii=True, separators=(",", ":"))


class TextFormatter(logging.Formatter):
    """``ts LEVEL logger: msg key=value ...`` on one line; control characters in the message
    and values are escaped so logged user input cannot forge a line. A traceback follows
    on indented lines, as people expect to read one. Without ``timestamp`` (the journal has
    its own) the line starts at the level."""

    def __init__(self, *, timestamp: bool = True) -> None:
        super().__init__()
        self._timestamp = timestamp

    def format(self, record: logging.LogRecord) -> str:
        line = f"{record.levelname:<7} {record.name}: {_escape(record.getMessage())}"
        if self._timestamp:
            line = f"{_timestamp(record)} {line}"
        pairs = " ".join(f"{key}={_text_value(value)}" for key, value in extras(record).items())
        if pairs:
            line = f"{line} {pairs}"
        trace = ""
        if record.exc_info:
            trace = self.formatException(record.exc_info)
        elif record.exc_text:
            trace = record.exc_text
        if record.stack_info:
            trace = f"{trace}\n{self.formatStack(record.stack_info)}".lstrip("\n")
        if trace:
            line += "".join(f"\n    {t}" for t in trace.splitlines())
        return line


class _JournalPriority(logging.Formatter):
    """Prefixes ``<N>`` (syslog priority) which journald strips and stores as PRIORITY."""

    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self._inner = inner

    def format(self, record: logging.LogRecord) -> str:
        priority = _SYSLOG_PRIORITY.get(record.levelname, 6)
        text = self._inner.format(record)
        return "\n".join(f"<{priority}>{line}" for line in text.split("\n"))


def _is_journal(stream: TextIO) -> bool:
    """True when ``stream`` is the journal connection systemd names in JOURNAL_STREAM
    (``device:inode``), not merely when the variable is inherited by a redirected process."""
    expected = os.environ.get("JOURNAL_STREAM", "")
    try:
        st = os.fstat(stream.fileno())
    except (AttributeError, OSError, ValueError):
        return False
    return expected == f"{st.st_dev}:{st.st_ino}"


def _jsonable(value: Any) -> Any:
    """The value itself when it encodes as strict JSON, else its str()."""
    try:
        json.dumps(value, allow_nan=False)
        return value
    except (TypeError, ValueError, RecursionError):
        return _to_str(value)


def _to_str(value: Any) -> str:
    try:
        return str(value)
    except Exception:  # a broken __str__ must not lose the log record
        return f"<unprintable {type(value).__name__}>"


def _escape(text: str) -> str:
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


def _text_value(value: Any) -> str:
    """Bare when unambiguous, else double-quoted with backslash escapes."""
    text = _to_str(value)
    if text and _BARE.match(text):
        return text
    return '"' + _escape(text.replace("\\", "\\\\").replace('"', '\\"')) + '"'
