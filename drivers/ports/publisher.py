"""PortPublisher: the one object the driver uses to publish VM ports (allocate, sync, clear).

Blocking (subprocesses and /proc writes, a few milliseconds each): call it from a worker
thread, never on the event loop. Its methods are serialised by a lock, so callers on several
threads see one table at a time.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from drivers.ports import host, localnet, nft
from drivers.ports.allocate import HostView, allocate
from drivers.ports.forward import ForwardRule
from drivers.ports.model import PortBinding, PortRange, PortRequest, PublishedVm
from drivers.ports.ruleset import Ruleset, Skipped, TableConfig, render


@dataclass(frozen=True)
class SyncResult:
    forwarded: int
    skipped: tuple[Skipped, ...]
    localnet_bridges: tuple[str, ...]
    forward_rule: bool  # the FORWARD accept rule is in place
    seconds: float


class PortPublisher:
    def __init__(self, *, table: TableConfig = TableConfig(), port_range: PortRange = PortRange(),
                 forward_rule: bool = True, nft_command: str = nft.NFT, iptables: str = "iptables",
                 logger: logging.Logger | None = None) -> None:
        self.table = table
        self.port_range = port_range
        self.forward = ForwardRule(mark=table.mark, comment=f"{table.name}-published-ports",
                                   iptables=iptables) if forward_rule else None
        self._nft = nft_command
        self._log = logger or logging.getLogger("herdsman.ports")
        self._lock = threading.Lock()

    def allocate(self, instance_uuid: str, requests: Sequence[PortRequest], *,
                 others: Mapping[str, Sequence[PortBinding]], previous: Sequence[PortBinding] = (),
                 view: HostView | None = None) -> tuple[PortBinding, ...]:
        """Bindings for one VM's requests (PortConflict naming `ports.N` when one cannot be had)."""
        return allocate(instance_uuid, requests, others=others, previous=previous, owner=host.owner,
                        host=view if view is not None else host.host_view(), port_range=self.port_range)

    def render(self, vms: Iterable[PublishedVm]) -> Ruleset:
        vms = list(vms)
        bridges = {vm.bridge for vm in vms if vm.forwarded and vm.bridge}
        return render(vms, networks={b: host.bridge_networks(b) for b in bridges}, config=self.table)

    def sync(self, vms: Iterable[PublishedVm]) -> SyncResult:
        """Make the table forward exactly these VMs' bindings (all VMs, every time). Idempotent."""
        with self._lock:
            started = time.monotonic()
            ruleset = self.render(vms)
            before = {str(b) for b in nft.set_elements(self.table.name, "localnet_bridges", nft=self._nft)}
            for bridge in ruleset.localnet_bridges:
                localnet.set_route_localnet(bridge, True)
            for bridge in before - set(ruleset.localnet_bridges):
                localnet.set_route_localnet(bridge, False)  # the new table no longer guards it
            nft.apply(ruleset.text, nft=self._nft)
            in_place = False
            if self.forward is not None:
                if ruleset.empty:
                    self.forward.remove()
                else:
                    in_place = self.forward.ensure()
            for s in ruleset.skipped:
                self._log.warning("published port left out: %s is held by %s", s.binding.docker_port(), s.holder,
                                  extra={"uuid": s.instance_uuid})
            return SyncResult(forwarded=ruleset.forwarded, skipped=ruleset.skipped,
                              localnet_bridges=ruleset.localnet_bridges, forward_rule=in_place,
                              seconds=time.monotonic() - started)

    def clear(self) -> SyncResult:
        """Remove everything: the table, the FORWARD rule, route_localnet where we turned it on."""
        return self.sync(())
