"""Which VMs are only half on this host because of a migration, and which of their lifecycle
events are the migration's own (pure bookkeeping, fed from the driver's event handler).

The controller must see one VM, never two, never none; and a migration is not a crash:

- **incoming** (this host is the destination): libvirt announces the incoming domain with
  `started/migrated` while QEMU still waits for its memory. Until it runs here
  (`resumed/*`) it is left out of pings: it still runs on the source. If it stops before that
  (the migration failed or was cancelled), it was never ours here: the driver forgets it.
- **outgoing** (this host is the source): from `stopped/migrated` on, the VM runs elsewhere and
  is left out of pings; its `undefined` (UNDEFINE_SOURCE) is not a `destroy` for the controller.
  That holds whoever started the migration (this agent, `herdsman migrate`, an operator's virsh).

No event with detail `migrated` or `postcopy*` is reported as a container event: the migration's
reply says where the VM is. Nothing here ever stops, restarts or removes a VM.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Literal

import libvirt

from drivers.libvirt.events import LifecycleEvent

#: how long a VM that moved away stays hidden (its last events may arrive late)
MOVED_TTL = 600.0
_MIGRATION_DETAILS = ("migrated", "postcopy", "postcopy_failed")

Verdict = Literal["report", "quiet", "drop"]


class Presence:
    def __init__(self) -> None:
        self._outgoing: set[str] = set()
        self._moved: dict[str, float] = {}
        self._incoming: set[str] = set()

    # -- the source's side, told by the migration service ------------------------------------

    def start_out(self, uuid: str) -> None:
        self._outgoing.add(uuid)

    def end_out(self, uuid: str, *, moved: bool) -> None:
        self._outgoing.discard(uuid)
        if moved:
            self._moved[uuid] = time.monotonic()
        else:
            self._moved.pop(uuid, None)

    def adopt_incoming(self, uuids: Iterable[str]) -> None:
        """Incoming domains found when the agent (re)started (see `incoming_domains`)."""
        self._incoming.update(uuids)

    def migrating_out(self, uuid: str) -> bool:
        return uuid in self._outgoing

    # -- queries -------------------------------------------------------------------------------

    def hidden(self, uuid: str) -> bool:
        """Left out of pings: incoming and not running here yet, or moved to another host."""
        self._expire()
        return uuid in self._incoming or uuid in self._moved

    def incoming(self, uuid: str) -> bool:
        return uuid in self._incoming

    # -- events --------------------------------------------------------------------------------

    def on_event(self, event: LifecycleEvent) -> Verdict:
        """`report`: an ordinary event; `quiet`: the migration's own, not a container event;
        `drop`: a failed incoming domain, never ours here (forget it)."""
        uuid = event.uuid
        if event.event == "started" and event.detail == "migrated" and uuid not in self._outgoing:
            self._incoming.add(uuid)
            self._moved.pop(uuid, None)  # it came back
            return "quiet"
        if uuid in self._incoming:
            if event.event == "resumed":
                self._incoming.discard(uuid)  # runs here now
                return "quiet"
            if event.event in ("stopped", "undefined", "crashed"):
                self._incoming.discard(uuid)
                return "drop"
            return "quiet"
        if event.event == "stopped" and event.detail == "migrated":
            # whoever asked (this agent, `herdsman migrate`, virsh): the VM runs elsewhere now
            self._moved[uuid] = time.monotonic()
            return "quiet"
        if event.event == "undefined" and uuid in self._moved:
            return "quiet"
        if event.detail in _MIGRATION_DETAILS:
            return "quiet"
        return "report"

    def _expire(self) -> None:
        cutoff = time.monotonic() - MOVED_TTL
        for uuid in [u for u, at in self._moved.items() if at < cutoff]:
            del self._moved[uuid]


def incoming_domains(conn: libvirt.virConnect, uuids: Iterable[str]) -> set[str]:
    """Blocking: which of these domains wait for an incoming migration here right now. An agent
    restarted during a migration to this host finds them at adoption and must not report them
    before they run here. Such a domain is paused by the migration and transient (PERSIST_DEST
    defines it at the end; herdsman's own VMs are always persistent). Not by its job: libvirt
    gives no migration statistics on the destination."""
    wanted, found = set(uuids), set()
    for dom in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_PAUSED | libvirt.VIR_CONNECT_LIST_DOMAINS_TRANSIENT):
        uuid = dom.UUIDString()
        try:
            if uuid in wanted and tuple(dom.state(0)) == (libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PAUSED_MIGRATION):
                found.add(uuid)
        except libvirt.libvirtError:
            continue  # gone meanwhile
    return found
