"""The local debug mode: `herdsman up/ls/start/stop/rm/logs/migrate` without a controller.

The same handlers and driver as `herdsman run` do the work; only the events are made here
instead of arriving over the websocket. Defaults suit a laptop: qemu:///session and folders
under ~/.local for a normal user, the system's for root.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
import uuid as uuid_module
from pathlib import Path
from typing import Any

from agent.config import AgentConfig, load_config
from agent.handlers.compute import ComputeHandlers
from agent.protocol.events import Event
from agent.spec.cattle import spec_from_document
from agent.spec.errors import SpecError
from drivers.base import DriverError, NotFound, VmRecord
from drivers.libvirt.host_dirs import make_dir


def local_config(args: argparse.Namespace) -> AgentConfig:
    config = load_config(args)
    if os.geteuid() != 0:
        home = Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share")) / "herdsman"
        explicit = {k for k in ("state_dir", "log_dir") if getattr(args, k, None)}
        updates: dict[str, Any] = {}
        if "state_dir" not in explicit:
            updates["state_dir"] = home / "state"
        if "log_dir" not in explicit:
            updates["log_dir"] = home / "log"
        config = config.model_copy(update=updates)
    return config


def _activate_event(spec_doc: dict[str, Any], instance_uuid: str) -> Event:
    instance = {"uuid": instance_uuid, "kind": "virtualMachine", "data": {"fields": spec_doc}}
    return Event(id=str(uuid_module.uuid4()), name="compute.instance.activate", resourceType="instanceHostMap",
                 resourceId=f"local-{instance_uuid[:8]}", data={"instanceHostMap": {"instance": instance}})


def _instance_event(name: str, instance_uuid: str, **process: Any) -> Event:
    data: dict[str, Any] = {"instanceHostMap": {"instance": {"uuid": instance_uuid}}}
    if process:
        data["processData"] = process
    return Event(id=str(uuid_module.uuid4()), name=f"compute.instance.{name}", resourceType="instanceHostMap",
                 resourceId=f"local-{instance_uuid[:8]}", data=data)


class LocalSession:
    def __init__(self, config: AgentConfig) -> None:
        from agent.app import build_driver

        make_dir(config.state_dir)  # missing parents too, traversable for qemu whatever the umask
        self.config = config
        self.driver = build_driver(config)
        self.handlers = ComputeHandlers(self.driver, stop_timeout=config.stop_timeout)

    async def __aenter__(self) -> "LocalSession":
        await self.driver.start()
        await self.driver.wait_ready(30)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.driver.close()

    async def find(self, name_or_uuid: str) -> VmRecord:
        matches = [vm for vm in await self.driver.list_vms() if name_or_uuid in (vm.name, vm.instance_uuid)]
        if not matches:
            raise NotFound(f"no virtual machine named {name_or_uuid!r} (herdsman ls lists them)")
        if len(matches) > 1:
            raise DriverError(f"{len(matches)} virtual machines are named {name_or_uuid!r}; use the uuid")
        return matches[0]


async def follow_log(path: Path, *, marker: str | None = None, until: float | None = None) -> bool:
    """Print the serial log as it grows; True once `marker` is seen (when one is given)."""
    offset = 0
    seen = ""
    while until is None or time.monotonic() < until:
        try:
            with open(path, "rb") as f:
                f.seek(offset)
                chunk = f.read()
        except FileNotFoundError:
            chunk = b""
        if chunk:
            offset += len(chunk)
            text = chunk.decode(errors="replace")
            sys.stdout.write(text)
            sys.stdout.flush()
            seen = (seen + text)[-4096:]
            if marker and marker in seen:
                return True
        await asyncio.sleep(0.2)
    return False


async def cmd_up(args: argparse.Namespace) -> int:
    import json

    document = json.loads(Path(args.spec).read_text())
    if args.image:
        document["imageUuid"] = args.image
    try:
        spec = spec_from_document(document)
    except SpecError as exc:
        for error in exc.errors:
            print(f"{args.spec}: {error}", file=sys.stderr)
        return 1
    import logging

    logging.getLogger("herdsman.provision").setLevel(logging.INFO)  # image download progress
    async with LocalSession(local_config(args)) as session:
        print(f"creating {spec.name or spec.instance_uuid} ({spec.instance_uuid}) on {session.config.libvirt_uri}",
              file=sys.stderr)
        doc = spec.to_api()
        doc.pop("uuid", None)
        reply = await session.handlers.activate(_activate_event(doc, spec.instance_uuid))
        state = reply["instance"]["+data"]["+fields"]["herdsmanState"]
        print(f"{spec.name or spec.instance_uuid}: {state}", file=sys.stderr)
        if args.detach:
            return 0
        log = session.driver.policy.layout.console_log_path(spec.instance_uuid)
        print(f"--- serial console log {log} (Ctrl-C leaves the VM running) ---", file=sys.stderr)
        until = time.monotonic() + args.timeout if args.timeout else None
        try:
            found = await follow_log(log, marker=args.until, until=until)
        except asyncio.CancelledError:
            return 0
        if args.until and not found:
            print(f"\n{args.until!r} did not appear within {args.timeout} s", file=sys.stderr)
            return 1
    return 0


async def cmd_ls(args: argparse.Namespace) -> int:
    from agent.health import state_file

    async with LocalSession(local_config(args)) as session:
        # HEALTH is what the daemon (`herdsman run`) last wrote: '-' without a running daemon
        health = state_file.read(state_file.path_in(session.config.state_dir))
        rows = [("NAME", "UUID", "STATE", "HEALTH", "ADDRESS", "IMAGE")]
        for vm in sorted(await session.driver.list_vms(), key=lambda v: (v.name or "", v.instance_uuid)):
            known = health.get(vm.instance_uuid)
            state = known.health_state if known is not None and vm.state == "running" else None
            rows.append((vm.name or "-", vm.instance_uuid, vm.state, state or "-", vm.primary_ip or "-", vm.image or "-"))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        for row in rows:
            print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    return 0


async def _simple(args: argparse.Namespace, action: str) -> int:
    async with LocalSession(local_config(args)) as session:
        vm = await session.find(args.name)
        uuid = vm.instance_uuid
        if action == "start":
            await session.driver.start_vm(uuid)
        elif action == "stop":
            process = {} if args.timeout is None else {"timeout": args.timeout}
            await session.handlers.deactivate(_instance_event("deactivate", uuid, **process))
        else:
            await session.handlers.purge(_instance_event("purge", uuid))
            print(f"{vm.name or uuid}: removed")
            return 0
        print(f"{vm.name or uuid}: {(await session.driver.get_vm(uuid)).state}")
    return 0


async def cmd_logs(args: argparse.Namespace) -> int:
    """The VM's serial log through the real stream path (agent.streams.client.local_stream)."""
    from websockets.exceptions import ConnectionClosed

    from agent.streams.client import StreamDenied, local_stream, messages
    from agent.streams.logs import PREFIX, LogsHandler

    if args.lines < 0:
        raise ValueError("--lines must be 0 or more")
    async with LocalSession(local_config(args)) as session:
        vm = await session.find(args.name)
        payload = {"Container": vm.instance_uuid, "Lines": args.lines, "Follow": args.follow}
        try:
            async with local_stream(session.driver, session.config, "logs", LogsHandler(session.driver), payload) as ws:
                async for message in messages(ws):
                    text = message if isinstance(message, str) else message.decode(errors="replace")
                    sys.stdout.write(text.removeprefix(PREFIX) + "\n")
                    sys.stdout.flush()
        except StreamDenied as exc:
            print(f"herdsman logs: {exc.reason}", file=sys.stderr)
            return 1
        except ConnectionClosed as exc:
            print(f"herdsman logs: {exc.rcvd.reason if exc.rcvd else 'connection lost'}", file=sys.stderr)
            return 1
    return 0


async def cmd_migrate(args: argparse.Namespace) -> int:
    """Live-migrate a VM to another host (a libvirt URI, or a host name: qemu+tcp://HOST/system),
    through the same driver path as compute.instance.migrate; progress on stderr."""
    from agent.spec.migration import parse_migrate
    from drivers.base import MigrationProgress

    destination: dict[str, Any] = {"libvirtUri": args.host} if "://" in args.host else {"host": args.host}
    if args.migration_uri:
        destination["migrationUri"] = args.migration_uri
    request = parse_migrate({"destination": destination})
    async with LocalSession(local_config(args)) as session:
        vm = await session.find(args.name)
        last = [""]

        def show(progress: MigrationProgress) -> None:
            if progress.message != last[0]:
                last[0] = progress.message
                print(f"{vm.name or vm.instance_uuid}: {progress.message}", file=sys.stderr)

        report = await session.driver.migrate_vm(vm.instance_uuid, request, show)
    downtime = f", downtime {report.downtime_ms} ms" if report.downtime_ms is not None else ""
    print(f"{vm.name or vm.instance_uuid}: migrated to {report.destination_uri} in {report.seconds:.1f} s{downtime}")
    if report.cleanup_error:
        print(f"warning: {report.cleanup_error}", file=sys.stderr)
    return 0


def add_commands(sub: argparse._SubParsersAction, add_arguments: Any) -> None:
    def local(name: str, help_: str) -> argparse.ArgumentParser:
        parser = sub.add_parser(name, help=help_)
        add_arguments(parser)
        return parser

    up = local("up", "create and start the VM of a virtualMachine JSON, then follow its serial console")
    up.add_argument("spec")
    up.add_argument("--image", help="boot this imageUuid instead of the spec's (e.g. kernel:file:///path/image.json)")
    up.add_argument("--detach", "-d", action="store_true", help="do not follow the console")
    up.add_argument("--until", help="stop following once this text appears on the console")
    up.add_argument("--timeout", type=float, default=0, help="stop following after this many seconds")
    up.set_defaults(async_func=cmd_up)
    local("ls", "list this host's VMs").set_defaults(async_func=cmd_ls)
    for name, text in (("start", "start a VM"), ("stop", "stop a VM (ACPI power button, then forced)"),
                       ("rm", "remove a VM with its volumes, seed and logs")):
        parser = local(name, text)
        parser.add_argument("name", help="the VM's name or uuid")
        if name == "stop":
            parser.add_argument("--timeout", type=int, default=None, help="seconds before the forced stop")
        parser.set_defaults(async_func=lambda a, action=name: _simple(a, action))
    logs = local("logs", "print a VM's serial console log (through the stream server, as `run` serves it)")
    logs.add_argument("name", help="the VM's name or uuid")
    logs.add_argument("--follow", "-f", action="store_true", help="keep printing new lines until Ctrl-C")
    logs.add_argument("--lines", "-n", type=int, default=100, help="how many of the last lines to print first (default 100)")
    logs.set_defaults(async_func=cmd_logs)
    migrate = local("migrate", "live-migrate a running VM to another host (its disks are copied)")
    migrate.add_argument("name", help="the VM's name or uuid")
    migrate.add_argument("host", help="the destination: a libvirt URI (qemu+tcp://HOST/system) or a host name or address")
    migrate.add_argument("--migration-uri", help="where QEMU sends the memory, tcp://ADDRESS[:PORT] (default: the host)")
    migrate.set_defaults(async_func=cmd_migrate)
