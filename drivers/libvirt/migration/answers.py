"""What the migration service tells its caller: progress, the report of a move, and the error
message of one that did not happen (pure functions over the runner's result)."""

from __future__ import annotations

import inspect
import logging

from drivers.base import MigrationProgress, MigrationProgressCallback, MigrationReport
from drivers.libvirt.migration.monitor import MIB, Progress
from drivers.libvirt.migration.runner import MigrationResult


def progress(p: Progress) -> MigrationProgress:
    return MigrationProgress(phase=p.phase, message=p.message(), percent=p.percent,
                             remaining_mib=None if p.remaining_mib is None else round(p.remaining_mib, 1),
                             rate_mib_s=None if p.rate_mib_s is None else round(p.rate_mib_s, 1))


async def call_listener(listener: MigrationProgressCallback, update: MigrationProgress,
                        log: logging.Logger) -> None:
    try:
        result = listener(update)
        if inspect.isawaitable(result):
            await result
    except Exception as exc:  # noqa: BLE001 - a progress reply that failed never stops a migration
        log.warning("migration progress listener failed", extra={"error": str(exc)})


def moved(uuid: str, uri: str, host_uuid: str | None, result: MigrationResult, removed: list[str],
          cleanup_error: str | None) -> MigrationReport:
    completed = result.completed
    return MigrationReport(
        instance_uuid=uuid, destination_uri=uri, destination_host_uuid=host_uuid,
        seconds=round(result.seconds, 3), downtime_ms=completed.get("downtime"),
        memory_mib=_mib(completed.get("memory_processed")), disk_mib=_mib(completed.get("disk_processed")),
        removed=tuple(removed), cleanup_error=cleanup_error)


def found_there(uuid: str, uri: str, host_uuid: str | None) -> MigrationReport:
    """A VM that already ran at the destination when asked (no figures: it moved earlier)."""
    return MigrationReport(instance_uuid=uuid, destination_uri=uri, destination_host_uuid=host_uuid, seconds=0.0,
                           downtime_ms=None, memory_mib=None, disk_mib=None, removed=(), cleanup_error=None)


def failure(result: MigrationResult, uri: str, *, cancelled: bool) -> str:
    outcome = result.outcome
    if outcome.verdict == "failed":
        if cancelled and result.reason == "cancelled":
            text = "the migration was cancelled"
        elif result.reason:
            text = f"the migration to {uri} was aborted: {result.reason}"
        else:
            text = f"the migration to {uri} failed: {result.error or 'libvirt gave no reason'}"
        text += "; the VM still runs on this host"
    else:
        text = f"the migration to {uri} ended unclearly ({outcome.verdict}): {outcome.message}"
    if result.cleanup_error:
        text += f"; on the destination: {result.cleanup_error}"
        if result.destination_unreachable:
            text += " (removed once it answers again)"
    return text


def _mib(value: object) -> float | None:
    return round(value / MIB, 1) if isinstance(value, int) else None
