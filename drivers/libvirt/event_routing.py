"""Where each libvirt lifecycle event goes, on the loop.

In order: the state book and the published ports learn every event; a domain not known yet is
learnt first (its metadata read on a worker, its events held and replayed), so a `virsh define`
or a migration in is adopted; a migration's own events stay out of the host's story
(migration/presence.py); the restart policy hears every stop the agent did not cause; and a change
nobody here asked for (not the agent's own operation, not under a VM's lock) goes to the host
event listeners, which report it to the controller as a container event.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine, Mapping, MutableMapping
from typing import Any

import libvirt

from drivers.base import DriverError, HostEvent
from drivers.libvirt import inventory, threads
from drivers.libvirt.connection import LibvirtUnavailable
from drivers.libvirt.domxml.model import AgentMetadata
from drivers.libvirt.events import LifecycleEvent
from drivers.libvirt.inventory import StateBook
from drivers.libvirt.migration.presence import Presence
from drivers.libvirt.own_events import OwnEvents
from drivers.libvirt.published_ports import PublishedPorts
from drivers.libvirt.restart_ops import RestartOps

#: Events after which a domain we do not know yet may be ours (virsh define, a migration in).
LEARN_ON = ("defined", "started")


class EventRouter:
    def __init__(self, *, registry: Callable[[], MutableMapping[str, AgentMetadata]], states: StateBook,
                 ports: PublishedPorts, presence: Presence, restarts: RestartOps, own: OwnEvents,
                 locks: Mapping[str, asyncio.Lock], connection: Callable[[], libvirt.virConnect],
                 forget: Callable[[str], None], spawn: Callable[[Coroutine[Any, Any, None]], None],
                 logger: logging.Logger) -> None:
        self._registry = registry
        self._states = states
        self._ports = ports
        self._presence = presence
        self._restarts = restarts
        self._own = own
        self._locks = locks
        self._connection = connection
        self._forget = forget
        self._spawn = spawn
        self._log = logger
        self._learning: dict[str, list[LifecycleEvent]] = {}
        self.listeners: list[Callable[[HostEvent], None]] = []

    def on_lifecycle(self, event: LifecycleEvent) -> None:
        if event.uuid in self._learning:
            self._learning[event.uuid].append(event)
            return
        self._states.apply(event.uuid, event.event)
        self._ports.on_lifecycle(event.uuid, event.event)
        registry = self._registry()
        if event.uuid not in registry:
            if event.event in LEARN_ON:  # ours, made outside the agent? read its metadata first
                self._learning[event.uuid] = [event]
                self._spawn(self._learn(event.uuid))
            return
        if event.event == "undefined":
            registry.pop(event.uuid, None)
        verdict = self._presence.on_event(event)  # a migration's events are not the host's
        if verdict == "drop":  # an incoming migration that failed: never ours here
            self._forget(event.uuid)
            self._states.apply(event.uuid, "undefined")
        if verdict != "report" or event.status is None:
            return
        own = event.event != "undefined" and self._own.consume(event.uuid, event.status)
        if not own:  # the policy's record tells a stop the controller asked for (lock held or not)
            self._restarts.on_event(event)
        lock = self._locks.get(event.uuid)
        if own or (event.event != "undefined" and lock is not None and lock.locked()):
            return  # the agent's own operation: its reply reports the state (container events are for changes on the host)
        host_event = HostEvent(instance_uuid=event.uuid, external_id=event.uuid, status=event.status,
                               timestamp=event.timestamp, cause=event.cause)
        for listener in self.listeners:
            listener(host_event)

    async def _learn(self, uuid: str) -> None:
        """A domain appeared: if it carries our metadata, adopt it and replay its events."""
        meta = None
        try:
            meta = await threads.call(self._read_metadata, uuid)
        except (libvirt.libvirtError, DriverError, LibvirtUnavailable) as exc:
            self._log.debug("a new domain's metadata could not be read", extra={"uuid": uuid, "error": str(exc)})
        events = self._learning.pop(uuid, [])
        if meta is None:
            return
        self._registry()[uuid] = meta
        for event in events:
            self.on_lifecycle(event)

    def _read_metadata(self, uuid: str) -> AgentMetadata | None:
        return inventory.read_metadata(self._connection().lookupByUUIDString(uuid))
