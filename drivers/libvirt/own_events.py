"""Which lifecycle events the agent caused itself.

Events arrive from libvirt's event thread after the operation that caused them may have
finished, so a lock held during the operation cannot tell them apart from changes on the host.
Before each step the driver says which event it is about to cause; an event matching it within
the window is the agent's own, and is not reported as a host event (the operation's reply
reports the state).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

#: How long the events of an operation may take to arrive.
WINDOW = 30.0


@dataclass(frozen=True)
class Expected:
    """One event the agent is about to cause, which libvirt may report as any of `statuses`
    (a graceful stop ends as "stop" or, when the plug is pulled, "die": one event, not two)."""
    statuses: frozenset[str]
    deadline: float


class OwnEvents:
    def __init__(self, window: float = WINDOW) -> None:
        self.window = window
        self._expected: dict[str, list[Expected]] = {}

    def expect(self, uuid: str, *statuses: str) -> None:
        """A new operation is about to cause one event with one of these statuses (none: nothing).
        It replaces what an earlier operation left unused, so a leftover never hides a real
        crash after the next start."""
        self._expected[uuid] = [self._one(statuses)] if statuses else []

    def expect_next(self, uuid: str, *statuses: str) -> None:
        """The same operation's next step (a restart's start after its stop): added behind what
        is still awaited, since the stop's event may not have arrived yet."""
        self._expected.setdefault(uuid, []).append(self._one(statuses))

    def consume(self, uuid: str, status: str) -> bool:
        """True (and forgotten) when an expected event of `uuid` matches `status` in its window."""
        pending = self._expected.get(uuid)
        if not pending:
            return False
        now = time.monotonic()
        pending[:] = [e for e in pending if e.deadline > now]
        for i, expected in enumerate(pending):
            if status in expected.statuses:
                del pending[i]
                return True
        return False

    def _one(self, statuses: tuple[str, ...]) -> Expected:
        return Expected(frozenset(statuses), time.monotonic() + self.window)
