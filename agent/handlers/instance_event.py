"""Reading what a compute.instance.* event carries (cattle-protocol.md §2, §3, §6)."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from agent.dispatcher import HandlerError
from agent.protocol.events import Event
from agent.spec.actions import InstanceStop, SetLabelsInput
from agent.spec.cattle import instance_from_event
from agent.spec.errors import SpecError
from drivers.base import Placement


def instance_of(event: Event) -> dict[str, Any]:
    instance = instance_from_event({"data": event.data or {}})
    if instance is None:
        raise HandlerError("data.instanceHostMap.instance: missing; this event names no instance")
    return instance


def instance_uuid(event: Event) -> str:
    instance = instance_of(event)
    value = instance.get("uuid")
    if not isinstance(value, str) or not value:
        raise HandlerError("data.instanceHostMap.instance.uuid: missing")
    return value


def process_data(event: Event) -> dict[str, Any]:
    data = event.data or {}
    value = data.get("processData") or {}
    if not isinstance(value, dict):
        raise HandlerError("data.processData: must be an object")
    return value


def placement_of(instance: dict[str, Any]) -> Placement:
    """MACs of the controller's NICs in device order, and the image object."""
    nics = instance.get("nics") or []
    if not isinstance(nics, list):
        raise HandlerError("instance.nics: must be a list")
    ordered = sorted((n for n in nics if isinstance(n, dict)), key=lambda n: n.get("deviceNumber") or 0)
    macs = []
    for index, nic in enumerate(ordered):
        mac = nic.get("macAddress")
        if mac is None:
            continue
        if not isinstance(mac, str) or not _is_mac(mac):
            raise HandlerError(f"instance.nics.{index}.macAddress: {mac!r} is not a MAC address")
        macs.append(mac.lower())
    image = instance.get("image")
    return Placement(macs=tuple(macs), image=image if isinstance(image, dict) else None)


def _is_mac(text: str) -> bool:
    parts = text.split(":")
    return len(parts) == 6 and all(len(p) == 2 and all(c in "0123456789abcdefABCDEF" for c in p) for p in parts)


def stop_timeout(event: Event, default: float) -> float:
    raw = process_data(event).get("timeout")
    if raw is None:
        return default
    try:
        return float(InstanceStop.model_validate({"timeout": raw}).timeout or 0)
    except ValidationError as exc:
        raise SpecError.from_validation(exc, "processData") from None


def labels_of(event: Event) -> dict[str, str]:
    """setlabels input: processData.labels, data.labels, or the instance's labels field."""
    data = event.data or {}
    candidates = [process_data(event).get("labels"), data.get("labels")]
    instance = instance_from_event({"data": data})
    if instance is not None:
        fields = (instance.get("data") or {}).get("fields") or {}
        candidates += [instance.get("labels"), fields.get("labels") if isinstance(fields, dict) else None]
    labels = next((c for c in candidates if c is not None), None)
    if labels is None:
        raise HandlerError("labels: missing (expected in processData.labels)")
    try:
        return dict(SetLabelsInput.model_validate({"labels": labels}).labels)
    except ValidationError as exc:
        raise SpecError.from_validation(exc) from None
