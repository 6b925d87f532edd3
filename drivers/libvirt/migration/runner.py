"""One migration, start to verdict: prepare, migrate, watch, decide from both hosts, clean up.

libvirt calls go through `blocking` (default `asyncio.to_thread`; the driver passes its worker
pool), except `migrateToURI3`, which gets a thread of its own: it lasts as long as the
migration and does not return while the network is down (migration.md §5.2), so it must not
hold a pool worker, and nothing here waits for it. jobStats is given STATS_TIMEOUT: when
libvirt holds the job for a stuck QEMU call, that counts as "nothing moved". The loop ends
when the job is over or the call returned; after an abort, when the job ended or, if the
source stays frozen (sockets.py), after releasing it. The verdict comes from the domain's
state on both hosts (outcome.py), never from the call. `attach` does the same for a migration
this process did not start (the agent was restarted meanwhile: journal.py).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, Literal, TypeVar

import libvirt

from drivers.libvirt.migration import destination, destxml, sockets
from drivers.libvirt.migration.disks import domain_disks
from drivers.libvirt.migration.link import DestinationLink
from drivers.libvirt.migration.monitor import JobSample, Monitor, Progress
from drivers.libvirt.migration.options import Destination, MigrationOptions
from drivers.libvirt.migration.outcome import Outcome, decide, read_side
from drivers.libvirt.migration.plan import MigrationCall, build_call

T = TypeVar("T")
Blocking = Callable[[Callable[[], T]], Awaitable[T]]
Release = Callable[[], str]
STATS_TIMEOUT = 5.0  # libvirt waits 30 s for a busy job lock; we stop waiting sooner
ABORT_WAIT = 5.0  # the abort call may hang with the frozen source (see _request_abort)
#: a destination that does not answer this long once the job is over is taken as unreachable
#: (with the link down a call would wait for TCP to give up: ~15 minutes)
DEST_TIMEOUT = 30.0
ACTIVE_JOB = libvirt.VIR_DOMAIN_JOB_UNBOUNDED
ProgressCallback = Callable[[Progress], Awaitable[None] | None]


@dataclass
class MigrationResult:
    outcome: Outcome
    seconds: float
    call: MigrationCall | None = None  # None: a migration this process found running (attach)
    reason: str | None = None  # why the monitor aborted or switched to post-copy
    error: str | None = None  # migrateToURI3's error, if it returned one
    completed: dict[str, Any] = field(default_factory=dict)  # jobStats(COMPLETED) on the destination
    samples: list[JobSample] = field(default_factory=list)
    progress: list[Progress] = field(default_factory=list)
    cleanup_error: str | None = None
    released: str | None = None  # sockets destroyed to free a source frozen by the abort
    aborted_at: float | None = None  # when the monitor decided to abort (the clock's time)
    #: the destination stopped answering: what was prepared there (`prepared`) is still there
    destination_unreachable: bool = False
    prepared: destination.Prepared | None = None
    #: the destination connection in use at the end (a new one if the given one broke: link.py)
    destination_conn: libvirt.virConnect | None = None


async def _to_thread(fn: Callable[[], T]) -> T:
    return await asyncio.to_thread(fn)


async def migrate(src: libvirt.virConnect, dst: libvirt.virConnect, uuid: str, dest: Destination,
                  options: MigrationOptions, *, blocking: Blocking[Any] | None = None,
                  on_progress: ProgressCallback | None = None, cancel: asyncio.Event | None = None,
                  release: Release | None | Literal["local"] = "local", abort_grace: float = 10.0,
                  settle_timeout: float = 60.0, clock: Callable[[], float] = time.monotonic,
                  on_prepared: Callable[[destination.Prepared], Awaitable[None]] | None = None,
                  reopen_destination: Callable[[], libvirt.virConnect] | None = None) -> MigrationResult:
    """Live-migrate domain `uuid` from `src` to `dst` (the destination's URIs in `dest`).

    `release` frees a source frozen by an abort (sockets.py); "local" runs `ss -K` here,
    which is right when this process runs on the source host (the agent does). `on_prepared`
    hears what was made on the destination before anything moves (the service journals it);
    `reopen_destination` replaces a destination connection that broke meanwhile (link.py).
    """
    run = blocking or _to_thread
    release = _local_release(release, dest)
    dom = await run(lambda: src.lookupByUUIDString(uuid))
    xml = await run(lambda: dom.XMLDesc(0))
    call = build_call(options, domain_disks(xml), dest)
    prepared = await run(lambda: destination.prepare(src, dst, xml))
    try:
        paths = await run(lambda: destxml.volume_paths(dst, domain_disks(xml)))
        if paths:  # see destxml: libvirt cannot find a volume disk on the destination by itself
            live = await run(lambda: dom.XMLDesc(libvirt.VIR_DOMAIN_XML_MIGRATABLE))
            persistent = await run(lambda: dom.XMLDesc(libvirt.VIR_DOMAIN_XML_MIGRATABLE | libvirt.VIR_DOMAIN_XML_INACTIVE))
            call = replace(call, params={**call.params,
                                         libvirt.VIR_MIGRATE_PARAM_DEST_XML: destxml.with_file_disks(live, paths),
                                         libvirt.VIR_MIGRATE_PARAM_PERSIST_XML: persistent})
        if on_prepared is not None:
            await on_prepared(prepared)
    except BaseException:
        await run(lambda: destination.undo(dst, prepared))
        raise
    memory = (await run(dom.maxMemory)) * 1024
    started = clock()
    monitor = Monitor(options, moved_bytes=memory + prepared.copied_bytes, started=started)
    result = MigrationResult(outcome=Outcome("in-progress", ""), call=call, seconds=0.0)
    call_done = _start_call(dom, call)
    await _guarded_watch(dom, monitor, call_done, result, run, options, on_progress, cancel, abort_grace, release, clock)
    link = DestinationLink(dst, reopen_destination)
    return await _conclude(src, link, dom, uuid, prepared, call_done, result, run, clock, settle_timeout, started)


async def attach(src: libvirt.virConnect, dst: libvirt.virConnect, uuid: str, dest: Destination,
                 options: MigrationOptions, prepared: destination.Prepared, *, blocking: Blocking[Any] | None = None,
                 on_progress: ProgressCallback | None = None, cancel: asyncio.Event | None = None,
                 release: Release | None | Literal["local"] = "local", abort_grace: float = 10.0,
                 settle_timeout: float = 60.0, clock: Callable[[], float] = time.monotonic,
                 reopen_destination: Callable[[], libvirt.virConnect] | None = None) -> MigrationResult:
    """Finish a migration of `uuid` that this process did not start (an agent restarted while
    libvirt went on with it, see journal.py): watch its job if it still runs, as `migrate`
    would (watchdog, completion deadline, cancel), then decide from both hosts and clean up."""
    run = blocking or _to_thread
    release = _local_release(release, dest)
    started = clock()
    result = MigrationResult(outcome=Outcome("in-progress", ""), seconds=0.0)
    never: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()  # the call is not ours
    dom = None
    if (await run(lambda: read_side(src, uuid))).exists:
        dom = await run(lambda: src.lookupByUUIDString(uuid))
        stats = await _stats(dom, run, STATS_TIMEOUT)
        if stats is not None and JobSample.from_stats(stats, clock()).active:
            memory = (await run(dom.maxMemory)) * 1024
            monitor = Monitor(options, moved_bytes=memory + prepared.copied_bytes, started=started)
            await _guarded_watch(dom, monitor, never, result, run, options, on_progress, cancel,
                                 abort_grace, release, clock)
    link = DestinationLink(dst, reopen_destination)
    return await _conclude(src, link, dom, uuid, prepared, never, result, run, clock, settle_timeout, started)


def _local_release(release: Release | None | Literal["local"], dest: Destination) -> Release | None:
    return partial(sockets.drop_connections, dest.migration_address) if release == "local" else release


async def _guarded_watch(dom: libvirt.virDomain, monitor: Monitor, call_done: asyncio.Future[str | None],
                         result: MigrationResult, run: Blocking[Any], options: MigrationOptions,
                         on_progress: ProgressCallback | None, cancel: asyncio.Event | None, abort_grace: float,
                         release: Release | None, clock: Callable[[], float]) -> None:
    try:
        await _watch(dom, monitor, call_done, result, run, options, on_progress, cancel,
                     abort_grace, release, clock)
    except BaseException:
        # never leave a migration running unwatched (Nova #1905944): abort it, then report
        await _request_abort(dom, run, postcopy=monitor.phase == "postcopy")
        raise


async def _conclude(src: libvirt.virConnect, link: DestinationLink, dom: libvirt.virDomain | None, uuid: str,
                    prepared: destination.Prepared, call_done: asyncio.Future[str | None],
                    result: MigrationResult, run: Blocking[Any], clock: Callable[[], float],
                    settle_timeout: float, started: float) -> MigrationResult:
    """The verdict from both hosts; after a failure, the source resumed and the destination cleaned."""
    result.prepared = prepared
    try:
        result.outcome, result.destination_unreachable = await _settle(src, link, uuid, run, clock, settle_timeout)
        result.seconds = clock() - started
        if call_done.done():
            result.error = call_done.result()
        if result.outcome.verdict == "succeeded":
            try:
                result.completed = await _bounded(run, lambda: link.call(lambda c: _completed_stats(c, uuid)),
                                                  DEST_TIMEOUT)
            except TimeoutError:
                pass  # the figures are a bonus
        elif result.outcome.verdict == "failed":
            if result.outcome.source_paused and dom is not None:
                await run(dom.resume)
            if result.destination_unreachable:
                result.cleanup_error = ("the destination does not answer; left there for now: "
                                        f"{', '.join(prepared.paths) or 'nothing'}")
            else:
                result.cleanup_error = await clean_destination(link, uuid, prepared, run, clock, settle_timeout)
    finally:
        result.destination_conn = link.conn
    return result


async def _bounded(run: Blocking[T], fn: Callable[[], T], timeout: float) -> T:
    """`fn` on the pool, waiting `timeout` at most (TimeoutError; the call finishes in its thread)."""
    call = asyncio.ensure_future(run(fn))
    try:
        return await asyncio.wait_for(asyncio.shield(call), timeout)
    except TimeoutError:
        call.add_done_callback(lambda f: f.cancelled() or f.exception())
        raise


async def _watch(dom: libvirt.virDomain, monitor: Monitor,
                 call_done: asyncio.Future[str | None], result: MigrationResult, run: Blocking[Any],
                 options: MigrationOptions, on_progress: ProgressCallback | None,
                 cancel: asyncio.Event | None, abort_grace: float, release: Release | None,
                 clock: Callable[[], float]) -> None:
    """Poll jobStats and act on the monitor's decisions until the migration is over for us."""
    last: JobSample | None = None
    answered = clock()
    while True:
        stats = await _stats(dom, run, STATS_TIMEOUT)
        now = clock()
        if stats is not None:
            sample = last = JobSample.from_stats(stats, now)
            answered = now
        elif now - answered >= options.progress_timeout:
            # libvirt has held the job (a QEMU call that does not return) for the whole watchdog
            # period: count it as nothing moved, so the watchdog can act
            sample = replace(last, t=now) if last is not None else JobSample(t=now, job_type=ACTIVE_JOB)
        else:
            continue  # busy for a moment (setting up the disk copy): no sample
        decision = monitor.observe(sample)
        if cancel is not None and cancel.is_set() and decision.action == "continue":
            decision = monitor.cancel(decision.progress)
        result.samples.append(sample)
        result.progress.append(decision.progress)
        if on_progress is not None and (pending := on_progress(decision.progress)) is not None:
            await pending
        if decision.action == "abort":
            result.reason, result.aborted_at = decision.reason, sample.t
            await _request_abort(dom, run, postcopy=decision.in_postcopy)
            await _after_abort(dom, monitor, call_done, run, abort_grace, release, result, clock)
            return
        if decision.action == "postcopy":
            result.reason = decision.reason
            if await run(lambda: _start_postcopy(dom)):
                monitor.postcopy_started()
        if call_done.done() or monitor.phase == "ended":
            return
        await asyncio.sleep(options.poll_interval)


async def _after_abort(dom: libvirt.virDomain, monitor: Monitor, call_done: asyncio.Future[str | None],
                       run: Blocking[Any], grace: float, release: Release | None, result: MigrationResult,
                       clock: Callable[[], float]) -> None:
    """Wait for the aborted job to end; if it hangs (a disk copy to an unreachable host freezes
    the source, sockets.py), release the sockets, then wait once more. Never for the call itself."""
    for attempt in ("wait", "release"):
        if attempt == "release":
            if release is None or monitor.phase == "postcopy":
                return  # post-copy: both halves are needed for a resume; never cut them
            try:
                result.released = await run(release)
            except Exception as exc:  # noqa: BLE001 - reported; the verdict still comes from the states
                result.released = f"could not release: {exc}"
        deadline = clock() + grace
        while clock() < deadline:
            if call_done.done():
                return
            stats = await _stats(dom, run, STATS_TIMEOUT)
            if stats is not None and not JobSample.from_stats(stats, clock()).active:
                return
            await asyncio.sleep(0.5)


async def _stats(dom: libvirt.virDomain, run: Blocking[Any], timeout: float) -> dict[str, Any] | None:
    """jobStats, or None when libvirt does not answer in time (it holds the job for a stuck
    monitor call; the blocked call finishes in its worker on its own)."""
    try:
        return await asyncio.wait_for(run(lambda: _job_stats(dom)), timeout)
    except TimeoutError:
        return None
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_OPERATION_TIMEOUT:
            return None
        raise


def _start_call(dom: libvirt.virDomain, call: MigrationCall) -> asyncio.Future[str | None]:
    """Run migrateToURI3 in its own thread; the future gets its error message (None: returned)."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[str | None] = loop.create_future()

    def report(error: str | None) -> None:
        if not done.done():
            done.set_result(error)

    def body() -> None:
        error = None
        try:
            dom.migrateToURI3(call.dconnuri, call.params, call.flags)
        except libvirt.libvirtError as exc:
            error = exc.get_error_message() or str(exc)
        try:
            loop.call_soon_threadsafe(report, error)
        except RuntimeError:
            pass  # the loop is gone: nobody is waiting any more

    threading.Thread(target=body, name="herdsman-migrate", daemon=True).start()
    return done


def _job_stats(dom: libvirt.virDomain) -> dict[str, Any]:
    try:
        return dom.jobStats(0)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() in (libvirt.VIR_ERR_NO_DOMAIN, libvirt.VIR_ERR_OPERATION_INVALID):
            return {"type": libvirt.VIR_DOMAIN_JOB_NONE}  # gone from the source: undefined after success
        raise


async def _request_abort(dom: libvirt.virDomain, run: Blocking[Any], *, postcopy: bool) -> None:
    """Ask libvirt to abort, waiting ABORT_WAIT at most for the call: with a disk copy to an
    unreachable destination, libvirtd's abortJob itself waits on the frozen QEMU until the
    sockets are released (sockets.py), which `_after_abort` does only if we get there."""
    call = asyncio.ensure_future(run(lambda: _abort(dom, postcopy=postcopy)))
    try:
        await asyncio.wait_for(asyncio.shield(call), ABORT_WAIT)
    except TimeoutError:
        call.add_done_callback(lambda f: f.cancelled() or f.exception())  # finishes on its own, later


def _abort(dom: libvirt.virDomain, *, postcopy: bool) -> None:
    """Abort the job; in post-copy, pause it instead (both halves kept for POSTCOPY_RESUME)."""
    try:
        if postcopy:
            dom.abortJobFlags(libvirt.VIR_DOMAIN_ABORT_JOB_POSTCOPY)
        else:
            dom.abortJob()
    except libvirt.libvirtError:
        pass  # the job ended meanwhile; the outcome says how


def _start_postcopy(dom: libvirt.virDomain) -> bool:
    try:
        dom.migrateStartPostCopy(0)
        return True
    except libvirt.libvirtError:
        return False  # too early or already over: not asked again, the deadline then aborts


def _completed_stats(dst: libvirt.virConnect, uuid: str) -> dict[str, Any]:
    try:
        return dst.lookupByUUIDString(uuid).jobStats(libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED)
    except libvirt.libvirtError:
        return {}


async def _settle(src: libvirt.virConnect, dst: DestinationLink, uuid: str, run: Blocking[Any],
                  clock: Callable[[], float], timeout: float) -> tuple[Outcome, bool]:
    """The verdict once the switchover (both paused, post-copy) is over, or as it stands at
    timeout; and whether the destination stopped answering (then: the VM running here means the
    migration failed; anything else cannot be told)."""
    deadline = clock() + timeout
    while True:
        source = await run(lambda: read_side(src, uuid))
        try:
            dest = await _bounded(run, lambda: dst.call(lambda c: read_side(c, uuid)), DEST_TIMEOUT)
        except TimeoutError:
            if source.running:
                return Outcome("failed", "the migration failed; the VM still runs on the source "
                                         "(the destination does not answer)"), True
            if clock() >= deadline:
                return Outcome("in-progress", "the destination does not answer and the VM no longer "
                                              "runs here: an operator must look"), True
            continue
        outcome = decide(source, dest)
        if outcome.final or clock() >= deadline:
            return outcome, False
        await asyncio.sleep(0.2)


async def clean_destination(dst: libvirt.virConnect | DestinationLink, uuid: str, prepared: destination.Prepared,
                            run: Blocking[Any], clock: Callable[[], float], timeout: float) -> str | None:
    """Remove the destination's prepared files once its libvirtd has dropped the incoming domain."""
    link = dst if isinstance(dst, DestinationLink) else DestinationLink(dst)
    deadline = clock() + timeout
    try:
        while (await _bounded(run, lambda: link.call(lambda c: read_side(c, uuid)), DEST_TIMEOUT)).exists:
            if clock() >= deadline:
                return (f"the destination still holds the incoming domain after {timeout:.0f} s; "
                        f"left in place: {', '.join(prepared.paths) or 'nothing'}")
            await asyncio.sleep(0.5)
        await run(lambda: link.call(lambda c: destination.undo(c, prepared)))
    except TimeoutError:
        return f"the destination stopped answering; left there: {', '.join(prepared.paths) or 'nothing'}"
    except (libvirt.libvirtError, destination.PreparationError) as exc:
        return f"destination cleanup failed: {exc}"
    return None
