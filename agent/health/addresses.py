"""Where each watched VM is probed: the quick lookup the probe scheduler calls per probe.

On the managed network a VM is probed at its own address (its DHCP lease, from
`driver.guest_network`, kept current by the driver's list). Under qemu:///session the guest
has no address the host can reach: qemu forwards host ports to it, so a VM is probed at
127.0.0.1 (or the rule's host address) and the host port forwarded to the check's port (the
VM's `dockerPorts`, 'hostIp:hostPort:guestPort/tcp').

A guest gets its lease seconds after it starts, so VMs without one are looked up again, a few
per pass, each less often the longer it has none (a VM on a host bridge never gets one that
libvirt knows): doubling to BACKOFF_CAP seconds.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any

from drivers.base import DriverError

PER_PASS = 16
BACKOFF_CAP = 30.0


def forwards(docker_ports: Any) -> dict[int, tuple[str, int]]:
    """Guest port → (host address, host port) from 'hostIp:hostPort:guestPort/tcp' entries."""
    found: dict[int, tuple[str, int]] = {}
    for entry in docker_ports or ():
        try:
            address, proto = str(entry).rsplit("/", 1)
            host_ip, host_port, guest_port = address.rsplit(":", 2)
            if proto == "tcp":
                found.setdefault(int(guest_port), ("127.0.0.1" if host_ip in ("", "0.0.0.0") else host_ip, int(host_port)))
        except ValueError:
            continue
    return found


class ProbeAddresses:
    def __init__(self, driver: Any, *, session: bool, first_retry: float = 2.0,
                 logger: logging.Logger | None = None) -> None:
        self.driver = driver
        self.session = session
        self.first_retry = first_retry
        self._log = logger or logging.getLogger("herdsman.health")
        self._addresses: dict[str, str] = {}
        self._forwards: dict[str, dict[int, tuple[str, int]]] = {}
        self._retry: dict[str, tuple[float, float]] = {}  # uuid → (next lookup, delay)

    def __call__(self, uuid: str, port: int) -> tuple[str, int] | None:
        """The scheduler's AddressOf: (numeric host, port), None while the VM has none."""
        if self.session:
            return self._forwards.get(uuid, {}).get(port)
        address = self._addresses.get(uuid)
        return None if address is None else (address, port)

    def known(self, uuid: str) -> bool:
        return uuid in (self._forwards if self.session else self._addresses)

    def learn(self, uuid: str, primary_ip: Any = None, docker_ports: Any = None) -> None:
        """What a reply or the driver's list says (None: nothing new)."""
        if self.session:
            if docker_ports is not None:
                self._forwards[uuid] = forwards(docker_ports)
        elif isinstance(primary_ip, str) and primary_ip:
            self._addresses[uuid] = primary_ip
            self._retry.pop(uuid, None)

    def forget(self, uuid: str) -> None:
        self._addresses.pop(uuid, None)
        self._forwards.pop(uuid, None)
        self._retry.pop(uuid, None)

    async def look_up(self, uuid: str) -> None:
        """Ask the driver now (a libvirt call: not per probe)."""
        try:
            if self.session:
                self.learn(uuid, docker_ports=(await self.driver.get_vm(uuid)).published_ports)
            else:
                self.learn(uuid, (await self.driver.guest_network(uuid)).primary)
        except DriverError as exc:
            self._log.debug("health: no address yet", extra={"instanceUuid": uuid, "error": str(exc)})

    async def look_up_missing(self, watched: Iterable[str]) -> None:
        """One pass over the watched VMs without an address, each at its own pace."""
        now = time.monotonic()
        due = [uuid for uuid in watched if not self.known(uuid) and self._retry.get(uuid, (0.0, 0.0))[0] <= now]
        for uuid in due[:PER_PASS]:
            await self.look_up(uuid)
            if not self.known(uuid):
                delay = min(2 * self._retry.get(uuid, (0.0, self.first_retry / 2))[1], BACKOFF_CAP)
                self._retry[uuid] = (time.monotonic() + delay, delay)
