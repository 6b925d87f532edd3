"""Migrations out of this host, as the driver runs them for `compute.instance.migrate`.

Holds what lives longer than one call: the cap on concurrent outgoing migrations (`limits`),
the migrations running or queued (so a cancel reaches one, and a repeated request attaches to
it instead of starting a second), the connections to destination libvirtds, the agent's
defaults (`--migration-*`), and the bookkeeping of half-present VMs (`presence`).

One migration: under the VM's lock (no stop or start of it meanwhile), wait for a slot, open
the destination, check its herdsman host uuid if the controller named one, then
`runner.migrate` (prepare the destination, migrate, watch, verdict from both hosts). Success:
the VM runs there and its definition (with herdsman's metadata) went with it; here its volumes,
seed and console log are deleted (the disks were copied) and it is forgotten. Anything else:
it still runs here (the runner removed what it made on the destination) and the error says
why. Every libvirt call runs on the driver's worker pool; migrateToURI3 on a thread of its own.

The agent may be killed at any moment of this, and libvirt carries on without it: what is
needed to finish is journaled (journal.py) once the destination is prepared, and `recover`
(after a start) attaches to the migration, or decides what became of it, and cleans up. A
request for a VM that already runs at the named destination is answered as done.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import libvirt

from agent.spec.migration import MigrateInput, MigrationSettings
from drivers.base import DriverError, MigrationProgress, MigrationProgressCallback, MigrationReport, NotFound
from drivers.libvirt import domain_ops, inventory, threads
from drivers.libvirt.migration import answers, port_check, runner
from drivers.libvirt.migration.destination import Prepared
from drivers.libvirt.migration.destinations import OPEN_TIMEOUT, Destinations, close_quietly, message, open_destination
from drivers.libvirt.migration.journal import Entry, Journal, Owner
from drivers.libvirt.migration.limits import MigrationSlots
from drivers.libvirt.migration.options import Destination, MigrationOptions
from drivers.libvirt.migration.outcome import read_side
from drivers.libvirt.migration.presence import Presence

#: one libvirt step of a migration may take this long (preparing copies whole base images)
CALL_TIMEOUT = 3600.0
UNDEFINE_WAIT = 30.0
CLEAN_RETRY = 15.0  # a destination that stopped answering is tried again this often ...
CLEAN_FOR = 3600.0  # ... for this long, to remove what was prepared there


@dataclass(frozen=True)
class SourceHost:
    """What the service needs from the driver; the callables are blocking (worker threads)."""

    connection: Callable[[], libvirt.virConnect]
    lock: Callable[[str], asyncio.Lock]
    require: Callable[[str], libvirt.virDomain]  # NotFound when not ours
    purge: Callable[[libvirt.virConnect, str], list[str]]  # volumes, seed, console logs
    forget: Callable[[str], None]  # the driver's registry and address book (on the loop)
    state_dir: Path


@dataclass(eq=False)
class Running:
    uuid: str
    destination: str
    cancel: asyncio.Event = field(default_factory=asyncio.Event)
    listeners: list[MigrationProgressCallback] = field(default_factory=list)
    last: MigrationProgress | None = None
    started: bool = False
    task: asyncio.Task[MigrationReport] | None = None


class MigrationService:
    def __init__(self, host: SourceHost, *, logger: logging.Logger | None = None) -> None:
        self.host = host
        self.defaults = MigrationOptions()
        self.slots = MigrationSlots(2)
        self.presence = Presence()
        self._log = logger or logging.getLogger("herdsman.migration")
        self._running: dict[str, Running] = {}
        self.destinations = Destinations(self._blocking)
        self.journal = Journal(host.state_dir)
        self.recovers = False  # whether `recover` runs at adoption (the agent only: `herdsman run`)
        self._finished: dict[str, MigrationReport] = {}  # moved away lately: a repeat gets this
        self._cleanups: set[asyncio.Task[None]] = set()

    def configure(self, *, max_outgoing: int, bandwidth: int, progress_timeout: float,
                  completion_timeout: float, postcopy: bool) -> None:
        """The agent's settings (--migration-*): defaults every request may override."""
        self.slots.set_limit(max_outgoing)
        self.defaults = self.defaults.model_copy(update={
            "bandwidth": bandwidth, "progress_timeout": progress_timeout,
            "completion_per_gib": completion_timeout, "postcopy": postcopy})

    def options(self, settings: MigrationSettings) -> MigrationOptions:
        update: dict[str, Any] = {}
        if settings.bandwidth is not None:
            update["bandwidth"] = settings.bandwidth
        if settings.progress_timeout is not None:
            update["progress_timeout"] = settings.progress_timeout
        if settings.completion_timeout is not None:
            update["completion_per_gib"] = settings.completion_timeout
        if settings.postcopy is not None:
            update["postcopy"] = settings.postcopy
        if settings.auto_converge is not None:
            update["auto_converge"] = settings.auto_converge
        return MigrationOptions.model_validate({**self.defaults.model_dump(), **update})

    def running(self, uuid: str) -> bool:
        return uuid in self._running

    # -- requests ------------------------------------------------------------------------------

    async def migrate(self, uuid: str, request: MigrateInput,
                      progress: MigrationProgressCallback | None = None) -> MigrationReport:
        """Migrate `uuid` out; a request for a VM already migrating attaches to that migration."""
        uri = request.destination.uri
        self._finished = {u: r for u, r in self._finished.items() if self.presence.hidden(u)}
        done = self._finished.get(uuid)
        if done is not None and done.destination_uri == uri:
            self._log.info("migration request repeats one that succeeded", extra={"uuid": uuid})
            return done  # every event can arrive twice: the VM is already there
        current = self._running.get(uuid)
        if current is not None:
            if current.destination != uri:
                raise DriverError(f"virtual machine {uuid} is already migrating to {current.destination}; "
                                  "cancel that first")
            self._log.info("migration request attaches to the running one", extra={"uuid": uuid})
            if progress is not None:
                current.listeners.append(progress)
                if current.last is not None:
                    await answers.call_listener(progress, current.last, self._log)
            return await self._outcome(current)
        running = Running(uuid=uuid, destination=uri, listeners=[progress] if progress else [])
        running.task = asyncio.get_running_loop().create_task(self._run(running, request), name=f"migrate {uuid}")
        self._running[uuid] = running
        running.task.add_done_callback(lambda _: self._running.pop(uuid, None)
                                       if self._running.get(uuid) is running else None)
        return await self._outcome(running)

    async def _outcome(self, running: Running) -> MigrationReport:
        assert running.task is not None
        try:
            return await asyncio.shield(running.task)
        except asyncio.CancelledError:
            if running.task.cancelled() and running.cancel.is_set():
                raise DriverError(f"the migration of {running.uuid} was cancelled before it started; "
                                  "the VM still runs on this host") from None
            raise

    def cancel(self, uuid: str) -> bool:
        """Abort `uuid`'s migration (running: the monitor aborts it; queued: it never starts).
        False when there is none. Too late in post-copy: the VM then finishes on the destination."""
        running = self._running.get(uuid)
        if running is None:
            return False
        running.cancel.set()
        if not running.started and running.task is not None:
            running.task.cancel()
        self._log.info("migration cancel requested", extra={"uuid": uuid, "started": running.started})
        return True

    # -- one migration -------------------------------------------------------------------------

    async def _run(self, running: Running, request: MigrateInput) -> MigrationReport:
        uuid, target = running.uuid, request.destination
        options = self.options(request.options)
        dest = Destination(libvirt_uri=target.uri, migration_address=target.migration_address,
                           migration_port=target.migration_port)
        async with self.host.lock(uuid):
            src = self.host.connection()
            try:
                dom = await self._blocking(lambda: self.host.require(uuid))
            except NotFound:
                if (report := await self._already_there(uuid, dest, target.host_uuid)) is not None:
                    return report
                raise
            state = (await self._blocking(lambda: dom.state(0)))[0]
            if state != libvirt.VIR_DOMAIN_RUNNING:
                raise DriverError(f"virtual machine {uuid} is not running here: only a running VM migrates live")

            async def queued(ahead: int) -> None:
                await self._emit(running, MigrationProgress(
                    "queued", f"waiting for a migration slot ({self.slots.limit} at once; {ahead} ahead)"))

            async with self.slots.slot(uuid, on_queued=queued):
                running.started = True
                if running.cancel.is_set():
                    raise DriverError(f"the migration of {uuid} was cancelled before it started; "
                                      "the VM still runs on this host")
                self._log.info("migration starting", extra={"uuid": uuid, "destination": dest.libvirt_uri,
                                                            "migrateUri": dest.migrate_uri})
                dst = await self.destinations.get(dest.libvirt_uri)
                if target.host_uuid is not None:
                    await self.destinations.check_host_uuid(dst, target.host_uuid, dest.libvirt_uri,
                                                            self.host.state_dir)
                await self.check_ports(dom, dst, dest.libvirt_uri)
                entry: list[Entry] = []

                async def journal(prepared: Prepared) -> None:
                    entry.append(Entry(uuid, dest, target.host_uuid, options, prepared, Owner.current()))
                    await asyncio.to_thread(self.journal.write, entry[0])

                return await self._move(running, src, dest, lambda: runner.migrate(
                    src, dst, uuid, dest, options, blocking=self._blocking, cancel=running.cancel,
                    on_progress=lambda p: self._emit(running, answers.progress(p)), on_prepared=journal,
                    reopen_destination=partial(open_destination, dest.libvirt_uri)),
                    host_uuid=target.host_uuid, entry=entry)

    async def _move(self, running: Running, src: libvirt.virConnect, dest: Destination,
                    start: Callable[[], Awaitable[runner.MigrationResult]], *, host_uuid: str | None,
                    entry: list[Entry]) -> MigrationReport:
        """Run a migration (or the rest of one) to its verdict and act on it. `entry` holds the
        journal entry once there is one; it is removed when nothing is left to do."""
        uuid, uri = running.uuid, dest.libvirt_uri
        self.presence.start_out(uuid)
        moved = False
        try:
            result = await start()
            moved = result.outcome.verdict == "succeeded"
        except (libvirt.libvirtError, DriverError) as exc:
            # which call failed matters (a dropped destination connection, see the report)
            self._log.warning("migration step failed", exc_info=True, extra={"uuid": uuid})
            self.destinations.drop(uri)
            where = await self._where(src, uuid)
            if entry and running.task is not None:  # finished as after a restart, once this task is over
                running.task.add_done_callback(lambda _: self._recover_later(entry[0]))
            raise DriverError(f"the migration to {uri} failed: {message(exc)}; {where}") from None
        finally:
            self.presence.end_out(uuid, moved=moved)
        self.destinations.keep(uri, result.destination_conn)
        clean_later = result.outcome.verdict == "failed" and result.prepared is not None
        if result.destination_unreachable:
            self.destinations.drop(uri)  # a hung connection: never reused
            if clean_later:
                assert result.prepared is not None
                self._clean_later(uri, uuid, result.prepared)  # removes the journal entry when done
        if not moved:
            if not (result.destination_unreachable and clean_later):
                await self._forget_journal(uuid)
            if result.outcome.verdict in ("split", "lost", "in-progress", "postcopy-failed"):
                self._log.error("migration ended unclearly", extra={
                    "uuid": uuid, "destination": uri, "verdict": result.outcome.verdict,
                    "detail": result.outcome.message})
            raise DriverError(answers.failure(result, uri, cancelled=running.cancel.is_set()))
        removed, cleanup_error = await self._clean_source(src, uuid)
        await self._forget_journal(uuid)
        report = answers.moved(uuid, uri, host_uuid, result, removed, cleanup_error)
        self._finished[uuid] = report
        self._log.info("migration succeeded", extra={"uuid": uuid, "destination": uri,
                                                     "seconds": report.seconds, "downtimeMs": report.downtime_ms})
        return report

    async def check_ports(self, dom: libvirt.virDomain, dst: libvirt.virConnect, uri: str) -> None:
        """Refused before anything moves: a published port another VM publishes there (port_check)."""
        meta = await self._blocking(lambda: inventory.read_metadata(dom))
        if meta is None or not meta.ports:
            return
        uuid = dom.UUIDString()
        problems = port_check.conflicts(meta.ports, await self._blocking(
            lambda: port_check.destination_bindings(dst, uuid)))
        if problems:
            raise DriverError(f"cannot migrate to {uri}: {'; '.join(problems)}; nothing was moved, "
                              "the VM still runs on this host")

    async def _already_there(self, uuid: str, dest: Destination, host_uuid: str | None) -> MigrationReport | None:
        """A request for a VM that is no longer here: if it runs at the destination named, it
        moved (an earlier request's reply was lost, say in an agent restart): answered as done."""
        try:
            dst = await self.destinations.get(dest.libvirt_uri)
            there = await self._blocking(lambda: read_side(dst, uuid))
        except (libvirt.libvirtError, DriverError):
            return None
        if not there.running:
            return None
        self._log.info("migration request for a VM that already runs at its destination", extra={"uuid": uuid})
        report = answers.found_there(uuid, dest.libvirt_uri, host_uuid)
        self._finished[uuid] = report
        return report

    async def _clean_source(self, src: libvirt.virConnect, uuid: str) -> tuple[list[str], str | None]:
        """After success: the domain is undefined (UNDEFINE_SOURCE; done here if libvirt has not
        yet), then its volumes, seed and console log go. The disks were copied."""
        try:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + UNDEFINE_WAIT
            while (await self._blocking(lambda: read_side(src, uuid))).exists:
                if loop.time() >= deadline:
                    dom = await self._blocking(lambda: src.lookupByUUIDString(uuid))
                    await self._blocking(lambda: domain_ops.undefine(dom))
                    break
                await asyncio.sleep(0.2)
            removed = await self._blocking(lambda: self.host.purge(src, uuid))
        except (libvirt.libvirtError, DriverError) as exc:
            self._log.warning("migrated VM's files not removed from the source",
                              extra={"uuid": uuid, "error": message(exc)})
            return [], f"its files here were not removed: {message(exc)}"
        finally:
            self.host.forget(uuid)
        return removed, None

    async def _where(self, src: libvirt.virConnect, uuid: str) -> str:
        try:
            side = await self._blocking(lambda: read_side(src, uuid))
        except (libvirt.libvirtError, DriverError) as exc:
            return f"this host's libvirt cannot say where the VM is ({message(exc)})"
        if side.running:
            return "the VM still runs on this host"
        return "the VM is no longer running on this host: check the destination"

    # -- after a restart: what the journal says is unfinished --------------------------------

    async def recover(self) -> None:
        """Finish the migrations an earlier run of the agent left (journal.py): libvirt went on
        with them. Each is registered as running, so a repeated request or a cancel reaches it."""
        for entry in await asyncio.to_thread(self.journal.entries):
            if entry.owner.alive_elsewhere():
                continue  # another process (`herdsman migrate`) runs it and will finish it
            self._recover_later(entry)

    def _recover_later(self, entry: Entry) -> None:
        if entry.uuid in self._running:
            return
        running = Running(uuid=entry.uuid, destination=entry.destination.libvirt_uri, started=True)
        running.task = asyncio.get_running_loop().create_task(self._recover(running, entry),
                                                              name=f"migration recovery {entry.uuid}")
        self._running[entry.uuid] = running

        def done(task: asyncio.Task[MigrationReport]) -> None:
            if self._running.get(entry.uuid) is running:
                self._running.pop(entry.uuid, None)
            if not task.cancelled() and (exc := task.exception()) is not None:
                self._log.warning("unfinished migration not completed", extra={"uuid": entry.uuid, "error": str(exc)})

        running.task.add_done_callback(done)

    async def _recover(self, running: Running, entry: Entry) -> MigrationReport:
        uuid, uri = entry.uuid, entry.destination.libvirt_uri
        self._log.info("finishing a migration started earlier", extra={"uuid": uuid, "destination": uri})
        loop = asyncio.get_running_loop()
        deadline = loop.time() + CLEAN_FOR
        while True:
            try:
                dst = await self.destinations.get(uri)
                break
            except DriverError:
                if running.cancel.is_set() or loop.time() >= deadline:
                    raise DriverError(f"the migration to {uri} cannot be finished: the destination does not "
                                      f"answer; kept in {self.journal.path(uuid)}") from None
                await asyncio.sleep(CLEAN_RETRY)
        async with self.host.lock(uuid):
            src = self.host.connection()
            return await self._move(running, src, entry.destination, lambda: runner.attach(
                src, dst, uuid, entry.destination, entry.options, entry.prepared, blocking=self._blocking,
                cancel=running.cancel, on_progress=lambda p: self._emit(running, answers.progress(p)),
                reopen_destination=partial(open_destination, uri)), host_uuid=entry.host_uuid, entry=[])

    async def _forget_journal(self, uuid: str) -> None:
        await asyncio.to_thread(self.journal.remove, uuid)

    # -- destinations that stopped answering ----------------------------------------------------

    def _clean_later(self, uri: str, uuid: str, prepared: Any) -> None:
        task = asyncio.get_running_loop().create_task(self._clean_when_back(uri, uuid, prepared),
                                                      name=f"migration cleanup {uuid}")
        self._cleanups.add(task)
        task.add_done_callback(self._cleanups.discard)

    async def _clean_when_back(self, uri: str, uuid: str, prepared: Any) -> None:
        """A failed migration whose destination stopped answering: once it answers again (a new
        connection), remove what was prepared there, after its libvirtd dropped the incoming VM.
        The journal entry stays until then, so an agent restart meanwhile does it too."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + CLEAN_FOR
        while loop.time() < deadline:
            await asyncio.sleep(CLEAN_RETRY)
            try:
                dst = await self._blocking(lambda: open_destination(uri), timeout=OPEN_TIMEOUT)
            except (libvirt.libvirtError, DriverError):
                continue
            try:
                error = await runner.clean_destination(dst, uuid, prepared, self._blocking, loop.time, 120.0)
            finally:
                loop.run_in_executor(None, close_quietly, dst)
            if error is None:
                await self._forget_journal(uuid)
                self._log.info("migration leftovers removed from the destination", extra={"uuid": uuid, "destination": uri})
                return
            self._log.info("migration leftovers not removed yet", extra={"uuid": uuid, "destination": uri, "error": error})
        self._log.warning("migration leftovers left on the destination", extra={
            "uuid": uuid, "destination": uri, "paths": ", ".join(prepared.paths)})

    async def close(self) -> None:
        for task in list(self._cleanups):
            task.cancel()
        self.destinations.close()

    # -- helpers -------------------------------------------------------------------------------

    async def _blocking(self, fn: Callable[[], Any], timeout: float = CALL_TIMEOUT) -> Any:
        return await threads.call(fn, timeout=timeout)

    async def _emit(self, running: Running, progress: MigrationProgress) -> None:
        running.last = progress
        for listener in list(running.listeners):
            await answers.call_listener(listener, progress, self._log)
