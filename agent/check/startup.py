"""The host checks at agent start-up, logged.

They run in the background on a thread of their own (blocking libvirt and HTTP calls, never on
the agent's event loop), and reuse the host profile the agent probed: on a host where libvirt
re-probes qemu for every capabilities lookup, probing again would cost seconds each. A broken
check never delays serving the controller. `host_checks` (`herdsman check --json` in a child
process) is the same without the agent's profile.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sys

from agent.check import run_checks
from agent.config import SETTINGS, AgentConfig
from drivers.base import HostCheck
from drivers.libvirt.host_profile import HostProfile

_LEVELS = {"ok": logging.INFO, "warn": logging.WARNING, "fail": logging.ERROR}


def settings_environment(config: AgentConfig) -> dict[str, str]:
    """The configuration as the environment variables `herdsman check` reads."""
    env = {}
    for name, setting in SETTINGS.items():
        value = getattr(config, name)
        if value is not None:
            env[setting.env] = str(value)
    return env


async def host_checks(config: AgentConfig, *, timeout: float = 120.0) -> list[HostCheck]:
    """Run the checks in a child process and return them (an empty list when it failed)."""
    env = {k: v for k, v in os.environ.items() if k not in {s.env for s in SETTINGS.values()}}
    env.update(settings_environment(config))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agent", "check", "--json", env=env,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except BaseException:  # a timeout, or the agent stopping: the child must not outlive the wait
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise
    checks = []
    for line in out.decode(errors="replace").splitlines():
        with contextlib.suppress(ValueError, TypeError):
            checks.append(HostCheck(**json.loads(line)))
    if not checks:
        raise RuntimeError(f"herdsman check exited {proc.returncode}: {err.decode(errors='replace').strip()[-500:]}")
    return checks


async def log_host_checks(config: AgentConfig, logger: logging.Logger | None = None,
                          profile: HostProfile | None = None) -> list[HostCheck]:
    """Run the checks and log each one at its level (ok: INFO, warn: WARNING, fail: ERROR):
    in this process with the agent's `profile`, else in a child process."""
    log = logger or logging.getLogger("herdsman.check")
    try:
        if profile is not None:
            checks = await asyncio.to_thread(run_checks, config, profile)
        else:
            checks = await host_checks(config)
    except (OSError, RuntimeError, TimeoutError) as exc:
        log.warning("host checks could not run", extra={"error": str(exc)})
        return []
    for check in checks:
        log.log(_LEVELS.get(check.status, logging.WARNING), f"host check {check.name}: {check.status}",
                extra={"check": check.name, "status": check.status, "detail": check.detail, "fix": check.fix})
    counts = {status: sum(c.status == status for c in checks) for status in _LEVELS}
    log.log(logging.ERROR if counts["fail"] else logging.INFO, "host checks done", extra=counts)
    return checks
