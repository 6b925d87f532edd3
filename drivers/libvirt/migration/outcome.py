"""Where a VM is after a migration, from the domain's state on both hosts.

Never from migrateToURI3's return: it can fail after the guest already runs on the
destination, hang while the network is down, or succeed while the guest then crashes
(migration.md §5). libvirt's domain states on the two hosts are the truth:

| source                       | destination                    | outcome                 |
|------------------------------|--------------------------------|-------------------------|
| gone or shut off             | running                        | succeeded               |
| running                      | gone, or paused incoming       | failed (VM on source)   |
| paused by the migration      | gone                           | failed, source paused   |
| paused, post-copy failed     | any                            | post-copy failed        |
| any                          | running/paused, post-copy failed | post-copy failed      |
| paused (switchover)          | paused or running post-copy    | in progress             |
| gone                         | paused (incoming, resuming)    | in progress             |
| running                      | running                        | split (both run!)       |
| gone or shut off             | gone or shut off               | lost                    |

"split" and "lost" must never be acted on automatically: they are reported loudly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import libvirt

Verdict = Literal["succeeded", "failed", "in-progress", "postcopy-failed", "split", "lost"]

_POSTCOPY_FAILED = {
    libvirt.VIR_DOMAIN_RUNNING: libvirt.VIR_DOMAIN_RUNNING_POSTCOPY_FAILED,
    libvirt.VIR_DOMAIN_PAUSED: libvirt.VIR_DOMAIN_PAUSED_POSTCOPY_FAILED,
}


@dataclass(frozen=True)
class SideState:
    """A domain's state on one host (`exists=False`: no such domain there)."""

    exists: bool
    state: int = libvirt.VIR_DOMAIN_NOSTATE
    reason: int = 0

    @property
    def running(self) -> bool:
        return self.exists and self.state == libvirt.VIR_DOMAIN_RUNNING and not self.postcopy_failed

    @property
    def paused(self) -> bool:
        return self.exists and self.state == libvirt.VIR_DOMAIN_PAUSED

    @property
    def active(self) -> bool:
        return self.exists and self.state not in (libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_NOSTATE)

    @property
    def postcopy_failed(self) -> bool:
        return self.exists and _POSTCOPY_FAILED.get(self.state) == self.reason

    @property
    def in_postcopy(self) -> bool:
        return self.exists and (
            (self.state == libvirt.VIR_DOMAIN_RUNNING and self.reason == libvirt.VIR_DOMAIN_RUNNING_POSTCOPY)
            or (self.state == libvirt.VIR_DOMAIN_PAUSED and self.reason == libvirt.VIR_DOMAIN_PAUSED_POSTCOPY))


GONE = SideState(exists=False)


@dataclass(frozen=True)
class Outcome:
    verdict: Verdict
    message: str
    source_paused: bool = False  # failed, and the migration left the source paused: resume it

    @property
    def final(self) -> bool:
        return self.verdict != "in-progress"


def decide(source: SideState, dest: SideState) -> Outcome:
    if source.postcopy_failed or dest.postcopy_failed:
        return Outcome("postcopy-failed", "post-copy failed: the guest is split between the hosts and paused; "
                       "both halves are kept for a post-copy resume")
    if source.running and dest.running:
        return Outcome("split", "the VM runs on both hosts: nothing was changed, an operator must decide")
    if dest.running and not source.active:
        return Outcome("succeeded", "the VM runs on the destination and is gone from the source")
    if source.running and not dest.running and not dest.in_postcopy:
        return Outcome("failed", "the migration failed; the VM still runs on the source")
    if source.paused and not dest.active:
        return Outcome("failed", "the migration failed; the VM is paused on the source",
                       source_paused=source.reason == libvirt.VIR_DOMAIN_PAUSED_MIGRATION)
    if (source.paused and dest.active) or (not source.active and dest.paused) or dest.in_postcopy:
        return Outcome("in-progress", "switching over: the VM is paused or in post-copy")
    return Outcome("lost", "the VM runs on neither host")


def read_side(conn: libvirt.virConnect, uuid: str) -> SideState:
    """The domain's state on the host behind `conn` (listing, so a missing domain logs no error)."""
    for dom in conn.listAllDomains(0):
        if dom.UUIDString() == uuid:
            try:
                state, reason = dom.state(0)
            except libvirt.libvirtError as exc:
                if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                    return GONE
                raise
            return SideState(True, state, reason)
    return GONE
