"""Per-VM samples → Prometheus text exposition (format 0.0.4): pure, and fast at 1,000 VMs.

Every series carries the VM's instance uuid (`uuid`), stable for the VM's life; its name is in
`herdsman_vm_info` only, so renaming a VM does not break every other series' history (join
with `* on(uuid) group_left(name) herdsman_vm_info`). Counters are the hypervisor's, reset
when the VM's qemu process restarts; Prometheus' `rate()` handles that.

Why not prometheus_client's generic encoder here: at 1,000 VMs a scrape is ~30,000 series, and
building a `Sample` per series and encoding it generically costs ~6 µs each (about 200 ms per
scrape on the benchmark machine, see bench/README.md). These families are known in advance
and most label values are uuids and device names, so writing the lines directly is several
times faster. The agent's own metrics still go through prometheus_client, and the tests parse
this output with its parser.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Literal, get_args

from drivers.base import DiskSample, NicSample, VmSample, VmState

STATES: tuple[str, ...] = get_args(VmState)


@dataclass(frozen=True)
class Family:
    name: str
    kind: Literal["gauge", "counter"]
    help: str

    def head(self) -> str:
        return f"# HELP {self.name} {self.help}\n# TYPE {self.name} {self.kind}\n"


INFO = Family("herdsman_vm_info", "gauge", "A VM this agent manages (value 1), with its name")
STATE = Family("herdsman_vm_state", "gauge", "1 for the VM's current state, 0 for the others")
HEALTH = Family("herdsman_vm_health", "gauge", "1 for the VM's current health state (VMs with a health check)")
CPU = Family("herdsman_vm_cpu_seconds_total", "counter", "CPU time of the VM's qemu process (vCPUs and emulation)")
VCPU = Family("herdsman_vm_vcpu_seconds_total", "counter", "CPU time of each vCPU")
VCPUS = Family("herdsman_vm_vcpus", "gauge", "vCPUs online")
MEMORY = Family("herdsman_vm_memory_bytes", "gauge", "Memory the guest has now (balloon)")
MEMORY_MAX = Family("herdsman_vm_memory_max_bytes", "gauge", "Memory the guest may have")
RSS = Family("herdsman_vm_memory_rss_bytes", "gauge", "Host memory the VM's qemu process uses (resident)")
DISK: tuple[tuple[Family, Callable[[DiskSample], int]], ...] = (
    (Family("herdsman_vm_disk_read_bytes_total", "counter", "Bytes read from the disk"), lambda d: d.read_bytes),
    (Family("herdsman_vm_disk_written_bytes_total", "counter", "Bytes written to the disk"), lambda d: d.write_bytes),
    (Family("herdsman_vm_disk_reads_total", "counter", "Read requests completed"), lambda d: d.read_ops),
    (Family("herdsman_vm_disk_writes_total", "counter", "Write requests completed"), lambda d: d.write_ops),
)
NIC: tuple[tuple[Family, Callable[[NicSample], int]], ...] = (
    (Family("herdsman_vm_network_receive_bytes_total", "counter", "Bytes the VM received on the interface"),
     lambda n: n.rx_bytes),
    (Family("herdsman_vm_network_transmit_bytes_total", "counter", "Bytes the VM sent on the interface"),
     lambda n: n.tx_bytes),
    (Family("herdsman_vm_network_receive_packets_total", "counter", "Packets the VM received"), lambda n: n.rx_packets),
    (Family("herdsman_vm_network_transmit_packets_total", "counter", "Packets the VM sent"), lambda n: n.tx_packets),
    (Family("herdsman_vm_network_receive_errors_total", "counter", "Receive errors"), lambda n: n.rx_errors),
    (Family("herdsman_vm_network_transmit_errors_total", "counter", "Transmit errors"), lambda n: n.tx_errors),
    (Family("herdsman_vm_network_receive_drops_total", "counter", "Received packets dropped"), lambda n: n.rx_drops),
    (Family("herdsman_vm_network_transmit_drops_total", "counter", "Packets to send that were dropped"),
     lambda n: n.tx_drops),
)
FAMILIES: tuple[Family, ...] = (INFO, STATE, HEALTH, CPU, VCPU, VCPUS, MEMORY, MEMORY_MAX, RSS,
                                *(f for f, _ in DISK), *(f for f, _ in NIC))


def vm_text(samples: Iterable[VmSample], health: Mapping[str, str | None] | None = None) -> str:
    """The per-VM series of one scrape. `health` maps uuid → health state (`healthy`, ...) for
    VMs with a health check; the others get no `herdsman_vm_health` series. Families without
    a series are left out (libvirt's test driver reports state only)."""
    health = health or {}
    out: dict[Family, list[str]] = {f: [] for f in FAMILIES}
    info, state, healthy, cpu, vcpu = out[INFO], out[STATE], out[HEALTH], out[CPU], out[VCPU]
    scalars = ((VCPUS, "vcpus"), (MEMORY, "memory_bytes"), (MEMORY_MAX, "memory_max_bytes"), (RSS, "memory_rss_bytes"))
    for s in samples:
        u = f'uuid="{escape(s.instance_uuid)}"'
        info.append(f'{INFO.name}{{{u},name="{escape(s.name or "")}"}} 1\n')
        state.extend(f'{STATE.name}{{{u},state="{name}"}} {int(name == s.state)}\n' for name in STATES)
        current = health.get(s.instance_uuid)
        if current:
            healthy.append(f'{HEALTH.name}{{{u},health="{escape(current)}"}} 1\n')
        if s.cpu_seconds is not None:
            cpu.append(f"{CPU.name}{{{u}}} {s.cpu_seconds}\n")
        vcpu.extend(f'{VCPU.name}{{{u},vcpu="{i}"}} {t}\n' for i, t in enumerate(s.vcpu_seconds))
        for family, attr in scalars:
            value = getattr(s, attr)
            if value is not None:
                out[family].append(f"{family.name}{{{u}}} {value}\n")
        for disk in s.disks:
            labels = f'{u},disk="{escape(disk.name)}"'
            for family, read in DISK:
                out[family].append(f"{family.name}{{{labels}}} {read(disk)}\n")
        for nic in s.nics:
            labels = f'{u},interface="{escape(nic.name)}"'
            for family, read in NIC:
                out[family].append(f"{family.name}{{{labels}}} {read(nic)}\n")
    return "".join(family.head() + "".join(lines) for family, lines in out.items() if lines)


def escape(value: str) -> str:
    """A label value as the text format quotes it (backslash, double quote, newline)."""
    if "\\" in value or '"' in value or "\n" in value:
        return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return value
