"""`python -m tests.hosts up|down|status|exec`: the two-host environment by hand (as root).

    python -m tests.hosts up [--name dev]          # start hosts a and b; prints how to reach them
    python -m tests.hosts status                   # every environment on this machine
    python -m tests.hosts exec [--name dev] b -- CMD ARGS...   # run a command on host b
    python -m tests.hosts down [--name dev]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from tests.hosts import env as envs


def describe(env: envs.HostsEnv) -> str:
    lines = [f"environment {env.name} (slot {env.slot}, LAN {env.lan.subnet}, "
             f"root namespace at {env.root_address}) — {env.dir}"]
    for host in env.hosts.values():
        lines += [
            f"  host {host.role}: {host.hostname} {host.address} (bridge {host.bridge}, "
            f"host_uuid {host.host_uuid}, holder pid {host.holder_pid})",
            f"    from here:        virsh -c '{host.libvirt_uri}'",
            f"    from the other:   {host.tcp_uri}   migration {host.migration_uri}",
            f"    run on it:        python -m tests.hosts exec --name {env.name} {host.role} -- CMD",
        ]
    if env.timings:
        lines.append("  timings: " + ", ".join(f"{k}={v}" for k, v in env.timings.items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.hosts", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("up", "down", "exec"):
        p = sub.add_parser(name)
        p.add_argument("--name", default="dev")
        if name == "up":
            p.add_argument("--json", action="store_true", help="print the state as JSON")
        if name == "exec":
            p.add_argument("role")
            p.add_argument("argv", nargs=argparse.REMAINDER)
    sub.add_parser("status")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("tests.hosts: needs root (namespaces, cgroups, a second libvirtd)", file=sys.stderr)
        return 2

    if args.command == "up":
        env = envs.up(args.name, owner=None)
        print((env.dir / "state.json").read_text() if args.json else describe(env))
        return 0
    if args.command == "down":
        if not envs.down(args.name):
            print(f"no environment named {args.name}", file=sys.stderr)
            return 1
        return 0
    if args.command == "status":
        for env in envs.environments():
            owner = "command line" if env.owner is None else (
                f"pid {env.owner[0]}" + ("" if envs.owner_alive(env.owner) else " (gone: stale)"))
            print(describe(env) + f"\n  owner: {owner}")
        return 0
    # exec
    known = {e.name: e for e in envs.environments()}
    if args.name not in known or args.role not in known[args.name].hosts:
        print(f"no host {args.role!r} in environment {args.name!r}", file=sys.stderr)
        return 1
    command = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    host = known[args.name].hosts[args.role]
    os.execvp(host.command(command)[0], host.command(command))
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
