"""The pytest side: a session-wide two-host environment.

    from tests.hosts.fixture import hosts_env  # noqa: F401 (fixture)

    def test_something(hosts_env): ...

Skipped only when not root (CI runs as root, so there it always runs). Every test module that
imports the fixture gets its own session-scoped copy of it (that is how imported fixtures
work), so the environment itself is shared per process and counted: made once, torn down
after the last user. If the session is killed, the next `up` reaps what it left.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator

import pytest

from tests.hosts.env import HostsEnv, current_owner, up

_shared: HostsEnv | None = None
_users = 0


@pytest.fixture(scope="session")
def hosts_env() -> Iterator[HostsEnv]:
    global _shared, _users
    if os.geteuid() != 0:
        pytest.skip("the two-host environment needs root (namespaces, cgroups, libvirtd); "
                    "CI runs as root")
    if _shared is None:
        _shared = up(f"pytest-{os.getpid()}", owner=current_owner())
        print(f"\n[hosts] {_shared.name}: LAN {_shared.lan.subnet}, "
              + ", ".join(f"{k}={v}" for k, v in _shared.timings.items()), file=sys.stderr)
    _users += 1
    try:
        yield _shared
    finally:
        _users -= 1
        if _users == 0:
            env, _shared = _shared, None
            env.down()
