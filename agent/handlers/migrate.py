"""compute.instance.migrate and compute.instance.migrate.cancel (herdsman's extension events).

Sent to the agent of the host the VM runs on (the source). While the migration runs, progress
replies (`transitioning: "yes"`, percent, the phase, MiB left and the rate in the message) keep
the controller's call alive; the final reply says where the VM is. A migration that fails
answers with an error, and the VM still runs here. Both routes are not serialised per
instance (agent/app.py): a cancel must reach a running migration, and a repeated migrate
attaches to the running one (drivers/libvirt/migration/service.py) instead of waiting behind it.
"""

from __future__ import annotations

import time
from typing import Any, Awaitable, Callable

from agent.dispatcher import HandlerError
from agent.handlers.instance_event import instance_uuid, process_data
from agent.protocol.events import Event, make_progress_reply
from agent.spec.migration import parse_migrate
from drivers.base import Hypervisor, MigrationProgress, MigrationReport

Publish = Callable[[dict[str, Any]], Awaitable[None]]
#: at most one progress reply this often, unless the phase changes
PROGRESS_EVERY = 1.0


class MigrateHandlers:
    def __init__(self, driver: Hypervisor, publish: Publish, *, host_uuid: str) -> None:
        self.driver = driver
        self.publish = publish
        self.host_uuid = host_uuid

    async def migrate(self, event: Event) -> dict[str, Any]:
        uuid = instance_uuid(event)
        request = parse_migrate(process_data(event))
        if request.destination.host_uuid == self.host_uuid:
            raise HandlerError("processData.destination.hostUuid: that is this host; the VM is already here")
        report = await self.driver.migrate_vm(uuid, request, self._progress(event))
        return migrated_reply(report)

    async def cancel(self, event: Event) -> dict[str, Any]:
        uuid = instance_uuid(event)
        cancelled = await self.driver.cancel_migration(uuid)
        return {"instance": {"+data": {"+fields": {"herdsmanMigrationCancelled": cancelled}}}}

    def _progress(self, event: Event) -> Callable[[MigrationProgress], Awaitable[None]]:
        last: list[tuple[float, str]] = []

        async def send(progress: MigrationProgress) -> None:
            if not event.replyTo:
                return
            now = time.monotonic()
            if last and last[0][1] == progress.phase and now - last[0][0] < PROGRESS_EVERY:
                return
            last[:] = [(now, progress.phase)]
            await self.publish(make_progress_reply(event, progress.percent or 0, f"migrating: {progress.message}"))

        return send


def migrated_reply(report: MigrationReport) -> dict[str, Any]:
    """Where the VM went and what the move cost; it is no longer on this host."""
    migration: dict[str, Any] = {"destination": report.destination_uri, "seconds": report.seconds}
    if report.destination_host_uuid:
        migration["hostUuid"] = report.destination_host_uuid
    if report.downtime_ms is not None:
        migration["downtimeMs"] = report.downtime_ms
    if report.memory_mib is not None:
        migration["memoryMiB"] = report.memory_mib
    if report.disk_mib is not None:
        migration["diskMiB"] = report.disk_mib
    if report.cleanup_error:
        migration["sourceCleanup"] = report.cleanup_error
    return {"instance": {"externalId": report.instance_uuid,
                         "+data": {"+fields": {"herdsmanState": "migrated", "herdsmanMigration": migration}}}}
