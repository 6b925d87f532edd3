"""What the agent does when the restart policy has started a VM again: tell the controller, and
whoever else listens (the health monitor makes the VM `reinitializing`).

The controller hears it as Docker's restart manager made Rancher's agents report it: a
`containerEvent` with `externalStatus` "start" (docker emits `die`, then `start`, for a policy
restart; the `die` went out when the VM stopped). Its lifecycle event is the agent's own and is
not reported a second time.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger("herdsman.restarts")


def restart_event(instance_uuid: str, host_uuid: str, at: float) -> dict[str, Any]:
    """The containerEvent body for a restart by the policy (the shape of every host event)."""
    return {"externalId": instance_uuid, "externalStatus": "start", "externalTimestamp": int(at),
            "reportedHostUuid": host_uuid}


class RestartNotices:
    """The runner's `on_restarted`: posts the containerEvent through `send`, then calls each
    of `listeners` with the instance uuid (append to connect one; one failing spoils nothing)."""

    def __init__(self, send: Callable[[dict[str, Any]], None], host_uuid: str, *,
                 clock: Callable[[], float] = time.time) -> None:
        self._send = send
        self._host_uuid = host_uuid
        self._clock = clock
        self.listeners: list[Callable[[str], None]] = []

    def __call__(self, instance_uuid: str) -> None:
        self._send(restart_event(instance_uuid, self._host_uuid, self._clock()))
        for listener in list(self.listeners):
            try:
                listener(instance_uuid)
            except Exception:  # a listener's bug must not stop the others or the runner
                log.exception("a listener of VM restarts failed", extra={"instanceUuid": instance_uuid})
