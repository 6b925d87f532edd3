"""`herdsman check [--json] [settings...]`: the preflight, on the command line."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from typing import Any


def cmd_check(args: argparse.Namespace) -> int:
    import libvirt

    from agent.check import exit_code, format_lines, run_checks
    from agent.config import ConfigError, load_config

    try:
        config = load_config(args)
    except (ConfigError, OSError) as exc:
        print(f"herdsman check: {exc}", file=sys.stderr)
        return 2
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)  # errors are in the lines, not on stderr
    checks = run_checks(config)
    if args.json:
        for check in checks:
            print(json.dumps(asdict(check)))
    else:
        print("\n".join(format_lines(checks)))
    return exit_code(checks)


def add_commands(sub: argparse._SubParsersAction, add_arguments: Any) -> None:
    check = sub.add_parser("check", help="check this host for herdsman run: one line per check, exit 1 on any fail")
    add_arguments(check)
    check.add_argument("--json", action="store_true", help="one JSON object per check instead of text")
    check.set_defaults(func=cmd_check)
