"""The pytest side: a session-scoped two-host environment.

    from tests.hosts.fixture import hosts_env  # noqa: F401 (fixture)

    def test_something(hosts_env): ...

Skipped only when not root (CI runs as root, so there it always runs). The environment is
torn down at the end of the session; if the session is killed, the next `up` reaps it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator

import pytest

from tests.hosts.env import HostsEnv, current_owner, up

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="the two-host environment needs root "
                                "(namespaces, cgroups, libvirtd); CI runs as root")


@pytest.fixture(scope="session")
def hosts_env() -> Iterator[HostsEnv]:
    if os.geteuid() != 0:
        pytest.skip("the two-host environment needs root (namespaces, cgroups, libvirtd); "
                    "CI runs as root")
    env = up(f"pytest-{os.getpid()}", owner=current_owner())
    print(f"\n[hosts] {env.name}: LAN {env.lan.subnet}, "
          + ", ".join(f"{k}={v}" for k, v in env.timings.items()), file=sys.stderr)
    try:
        yield env
    finally:
        env.down()
