"""What the restart policy remembers about one VM, kept by the driver in the domain's metadata
so an agent restart neither forgets nor repeats a restart.

The driver stores `dumps(record)` as the text of an element under a metadata key of its own
(the record changes at run time, independently of the spec), and reads it back with `loads`.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass

FORMAT = 1


class RecordError(ValueError):
    """The stored text is not a restart record this agent understands."""


@dataclass(frozen=True, slots=True)
class RestartRecord:
    """`restart_count`: restarts by the policy since the controller last started the VM.
    `last_delay`: the backoff before the last one (s). `last_restart`: when it was due (Unix s).
    `pending`: a restart was decided and not yet done (an agent killed during the backoff does
    it when it comes back, without counting it twice). `stopped_by_controller`: the controller
    stopped the VM or created it stopped; the policy never undoes that."""

    restart_count: int = 0
    last_delay: float = 0.0
    last_restart: float | None = None
    pending: bool = False
    stopped_by_controller: bool = False

    @classmethod
    def started_by_controller(cls) -> RestartRecord:
        """What the driver stores when the controller starts (or restarts) the VM."""
        return cls()

    @classmethod
    def stopped(cls) -> RestartRecord:
        """What the driver stores before the controller's stop (or a create without start)."""
        return cls(stopped_by_controller=True)


_FIELDS = {"restartCount": "restart_count", "lastDelay": "last_delay", "lastRestart": "last_restart",
           "pending": "pending", "stoppedByController": "stopped_by_controller"}


def dumps(record: RestartRecord) -> str:
    values = asdict(record)
    return json.dumps({"format": FORMAT, **{wire: values[name] for wire, name in _FIELDS.items()}},
                      separators=(",", ":"), sort_keys=True)


def loads(text: str) -> RestartRecord:
    """Strict: a record that cannot be read must not be guessed at (it may say 'stopped by the
    controller'); the caller leaves such a VM alone and says so."""
    try:
        raw = json.loads(text)
    except ValueError as exc:
        raise RecordError(f"restart record is not JSON: {exc}") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise RecordError(f"restart record format {raw.get('format') if isinstance(raw, dict) else raw!r} "
                          f"is not {FORMAT}")
    unknown = set(raw) - set(_FIELDS) - {"format"}
    if unknown:
        raise RecordError(f"restart record has unknown fields {sorted(unknown)}")
    count, delay, last = raw.get("restartCount", 0), raw.get("lastDelay", 0.0), raw.get("lastRestart")
    pending, stopped = raw.get("pending", False), raw.get("stoppedByController", False)
    if type(count) is not int or count < 0:
        raise RecordError(f"restartCount {count!r} is not a count")
    if not _number(delay) or delay < 0:
        raise RecordError(f"lastDelay {delay!r} is not a delay")
    if last is not None and not _number(last):
        raise RecordError(f"lastRestart {last!r} is not a time")
    if type(pending) is not bool or type(stopped) is not bool:
        raise RecordError("pending and stoppedByController must be true or false")
    return RestartRecord(count, float(delay), None if last is None else float(last), pending, stopped)


def _number(value: object) -> bool:
    return type(value) in (int, float) and math.isfinite(value)  # type: ignore[arg-type]
