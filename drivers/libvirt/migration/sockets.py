"""Free a source VM that an aborted migration left frozen behind a dead network link.

Measured on the test hosts: with disks copied (NON_SHARED_INC), aborting a migration while
the destination is unreachable makes QEMU cancel its NBD mirror, which waits for writes the
destination will never acknowledge. QEMU's main loop blocks there, the guest stops (its
console goes silent), and every libvirt call that needs the domain's job waits 30 s and
fails, until TCP gives up on the connection: up to ~15 minutes with Linux defaults
(tcp_retries2=15). Without a disk copy the abort is immediate.

Destroying the source's TCP connections to the destination's QEMU migration ports
(`ss -K`, the kernel's sock_destroy) makes those writes fail at once: the mirror job ends,
the guest runs again, the migrate call returns. Only sockets to that address and port range
(QEMU's `migration_port_min..max`, which covers the NBD server too) are touched: nothing else
of the host's, and not libvirt's own connection to the destination.
"""

from __future__ import annotations

import subprocess

QEMU_MIGRATION_PORTS = (49152, 49215)  # qemu.conf migration_port_min/max defaults


def drop_command(address: str, ports: tuple[int, int] = QEMU_MIGRATION_PORTS) -> list[str]:
    """The `ss` command that destroys TCP sockets to `address` in the port range."""
    low, high = ports
    if ":" in address:
        address = f"[{address}]"
    return ["ss", "-K", "-t", "-n", "dst", address, "and", "dport", "ge", f":{low}",
            "and", "dport", "le", f":{high}"]


def drop_connections(address: str, ports: tuple[int, int] = QEMU_MIGRATION_PORTS) -> str:
    """Run `drop_command` in this host's network namespace; returns what ss listed (destroyed)."""
    result = subprocess.run(drop_command(address, ports), capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise RuntimeError(f"ss -K failed ({result.returncode}): {result.stderr.strip()}")
    return result.stdout
