"""The `herdsman` command: the daemon (`run`) and the tools around it."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

from agent import __version__
from agent.spec.cattle import spec_from_document
from agent.spec.errors import SpecError
from agent.spec.vm import VirtualMachine


def _load_json(path: str) -> Any:
    text = sys.stdin.read() if path == "-" else Path(path).read_text()
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise SystemExit(f"{path}: not JSON: {exc}") from None


def _load_spec(path: str) -> VirtualMachine | None:
    """The spec in `path`, or None after printing each error as `FILE: field.path: message`."""
    try:
        return spec_from_document(_load_json(path))
    except SpecError as exc:
        for error in exc.errors:
            print(f"{path}: {error}", file=sys.stderr)
        return None


def cmd_validate(args: argparse.Namespace) -> int:
    spec = _load_spec(args.spec)
    if spec is None:
        return 1
    print(f"{args.spec}: valid virtualMachine {spec.name or ''} ({spec.instance_uuid})".replace("  ", " "))
    return 0


def cmd_render(args: argparse.Namespace) -> int:
    from drivers.libvirt.domxml.builder import render_xml
    from drivers.libvirt.domxml.inputs import HostPolicy, RenderInput
    from drivers.libvirt.host_profile import HostProfile
    from drivers.libvirt.layout import HostLayout

    spec = _load_spec(args.spec)
    if spec is None:
        return 1
    profile = HostProfile(domain_type=args.domain_type, machine=args.machine, session=args.session)
    layout = HostLayout(state_dir=Path(args.state_dir), log_dir=Path(args.log_dir), storage_pool=args.storage_pool)
    policy = HostPolicy(layout=layout, network=args.network, bridge=args.bridge)
    try:
        sys.stdout.write(render_xml(RenderInput(spec=spec, profile=profile, policy=policy)))
    except ValueError as exc:  # RenderError, or a bug that still names its cause
        print(f"{args.spec}: {exc}", file=sys.stderr)
        return 1
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    import asyncio

    from agent.app import Agent
    from agent.config import ConfigError, load_config
    from agent.logs import configure_logging

    try:
        config = load_config(args)
    except (ConfigError, OSError) as exc:
        print(f"herdsman run: {exc}", file=sys.stderr)
        return 2
    configure_logging(config.log_format, config.log_level)
    asyncio.run(Agent(config, host_checks=True).run())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="herdsman", description="Runs virtual machines on this host for a Cattle-style controller.")
    parser.add_argument("--version", action="version", version=f"herdsman {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    from agent.config import add_arguments

    run = sub.add_parser("run", help="the agent daemon: serve a Cattle-style controller")
    add_arguments(run)
    run.set_defaults(func=cmd_run)

    from agent.local import add_commands

    add_commands(sub, add_arguments)

    from agent.streams.cli_console import add_commands as add_stream_commands

    add_stream_commands(sub, add_arguments)

    from agent.check.cli import add_commands as add_check_commands

    add_check_commands(sub, add_arguments)

    from agent.install import add_commands as add_install_commands

    add_install_commands(sub)

    validate = sub.add_parser("validate", help="check a virtualMachine spec (or a Cattle event); print each error with its field")
    validate.add_argument("spec", help="JSON file, or - for standard input")
    validate.set_defaults(func=cmd_validate)

    render = sub.add_parser("render", help="print the libvirt domain XML a spec (or a Cattle event) becomes")
    render.add_argument("spec", help="JSON file, or - for standard input")
    render.add_argument("--domain-type", choices=("kvm", "qemu"), default="qemu")
    render.add_argument("--machine", default="pc", help="machine type (default: pc)")
    render.add_argument("--session", action="store_true", help="render for qemu:///session (user-mode networking)")
    render.add_argument("--state-dir", default="/var/lib/herdsman")
    render.add_argument("--log-dir", default="/var/log/herdsman")
    render.add_argument("--storage-pool", default="herdsman")
    render.add_argument("--network", default="default", help="libvirt network for networkMode managed")
    render.add_argument("--bridge", default="br0", help="host bridge for networkMode bridge")
    render.set_defaults(func=cmd_render)
    return parser


def cmd_local(args: argparse.Namespace) -> int:
    """The debug-mode commands: errors are one line for the user, not a traceback."""
    import asyncio
    import logging

    from agent.config import ConfigError
    from drivers.base import DriverError

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        return asyncio.run(args.async_func(args))
    except KeyboardInterrupt:
        return 0
    except (ConfigError, DriverError, OSError, ValueError) as exc:
        print(f"herdsman {args.command}: {exc}", file=sys.stderr)
        return 1


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "async_func", None) is not None:
        return cmd_local(args)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
