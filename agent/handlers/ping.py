"""The ping reply: this host's resources, and with options.instances every VM and its state."""

from __future__ import annotations

import time
from typing import Any

from agent import hostinfo
from agent.protocol.events import Event
from drivers.base import Hypervisor, Unavailable, VmState


def cattle_state(state: VmState) -> str:
    """Cattle knows running and stopped; a paused or stopping guest still runs."""
    return "running" if state in ("running", "paused", "stopping", "starting") else "stopped"


class PingHandler:
    def __init__(self, driver: Hypervisor, *, host_uuid: str, storage_path: str, labels: dict[str, str] | None = None) -> None:
        self.driver = driver
        self.host_uuid = host_uuid
        self.storage_path = storage_path
        self.labels = labels or {}
        self._started = int(time.time())

    def _host_labels(self) -> dict[str, str]:
        facts = self.driver.host_facts()
        labels = {"io.herdsman.domain-type": facts.get("domainType") or "unknown"}
        # Cattle's scheduler uses this label for VMs; only a host with working KVM earns it.
        if facts.get("domainType") == "kvm":
            labels["io.rancher.host.kvm"] = "true"
        return {**labels, **self.labels}

    async def __call__(self, event: Event) -> dict[str, Any]:
        options = ((event.data or {}).get("options") or {}) if isinstance(event.data, dict) else {}
        name = hostinfo.hostname()
        facts = self.driver.host_facts()
        host: dict[str, Any] = {
            "type": "host",
            "kind": "libvirt",
            "uuid": self.host_uuid,
            "name": name,
            "hostname": name,
            "physicalHostUuid": self.host_uuid,
            "labels": self._host_labels(),
            "info": hostinfo.host_info(
                libvirt_version=facts.get("libvirtVersion", ""),
                qemu_version=facts.get("qemuVersion", ""),
                domain_type=facts.get("domainType", ""),
                disk_paths=[self.storage_path],
            ),
        }
        try:
            host.update(hostinfo.host_capacity(self.storage_path))
        except OSError:
            pass
        resources: list[dict[str, Any]] = [
            {"type": "physicalHost", "kind": "physicalHost", "uuid": self.host_uuid, "name": name},
            host,
            {"type": "storagePool", "kind": "libvirt", "uuid": f"{self.host_uuid}-pool",
             "hostUuid": self.host_uuid, "name": f"{name} Storage Pool"},
        ]
        address = hostinfo.primary_ip_address()
        if address:
            resources.append({"type": "ipAddress", "uuid": address, "address": address, "hostUuid": self.host_uuid})
        reply_options: dict[str, Any] = {}
        if options.get("instances"):
            try:
                vms = await self.driver.list_vms()
            except Unavailable:
                # No list at all rather than an empty one: Cattle would take an empty list for
                # "every VM is gone" and mark them destroyed.
                return {"resources": resources, "options": reply_options}
            resources.append({"type": "hostUuid", "uuid": self.host_uuid})
            for vm in vms:
                resources.append({
                    "type": "instance",
                    "uuid": vm.instance_uuid,
                    "externalId": vm.external_id,
                    "dockerId": vm.external_id,  # the field Cattle 1.6 matches instances on
                    "state": cattle_state(vm.state),
                    "image": vm.image,
                    "labels": vm.labels,
                    "created": self._started,
                    "systemContainer": None,
                    **({"primaryIpAddress": vm.primary_ip} if vm.primary_ip else {}),
                })
            reply_options["instances"] = True
        return {"resources": resources, "options": reply_options}
