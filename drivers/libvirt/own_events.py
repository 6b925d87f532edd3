"""Which lifecycle events the agent caused itself.

Events arrive from libvirt's event thread after the operation that caused them may have
finished, so a lock held during the operation cannot tell them apart from changes on the host.
Before each operation the driver says which statuses it is about to cause; an event with such a
status within the window is the agent's own, and is not reported as a host event (the
operation's reply reports the state).
"""

from __future__ import annotations

import time

#: How long the events of an operation may take to arrive.
WINDOW = 30.0


class OwnEvents:
    def __init__(self, window: float = WINDOW) -> None:
        self.window = window
        self._expected: dict[str, list[tuple[str, float]]] = {}

    def expect(self, uuid: str, *statuses: str) -> None:
        """The agent is about to cause these statuses. A new operation replaces what an earlier
        one left unused (a graceful stop expects "stop" or "die"; the other must not hide a real
        crash after the next start)."""
        deadline = time.monotonic() + self.window
        self._expected[uuid] = [(status, deadline) for status in statuses]

    def consume(self, uuid: str, status: str) -> bool:
        """True (and forgotten) when `status` of `uuid` was expected and is still in its window."""
        pending = self._expected.get(uuid)
        if not pending:
            return False
        now = time.monotonic()
        pending[:] = [(s, deadline) for s, deadline in pending if deadline > now]
        for i, (expected, _) in enumerate(pending):
            if expected == status:
                del pending[i]
                return True
        return False
