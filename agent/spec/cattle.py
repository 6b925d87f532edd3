"""Build a VirtualMachine from what a controller sends.

Cattle keeps some instance fields as columns (`memoryMb`, `userdata`, `name`, ...) and the rest
under `data.fields` (cattle-protocol.md §6); which one a field lives in has changed between
versions, so both places are read, the column winning when it is set (except for the keys
that name related objects in an event, see RELATION_KEYS). Keys that are not fields of the
resource (state, kind, nics, ...) are left out here: they are the controller's.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from agent.spec.errors import FieldError, SpecError
from agent.spec.vm import VirtualMachine

SPEC_KEYS: tuple[str, ...] = tuple(
    info.alias or name for name, info in VirtualMachine.model_fields.items()
)
#: Keys that an event's serialised instance also uses for related objects (`ports` is a list of
#: port records, `instanceLinks` a list of link records: `event.data.instance=...|ports|
#: instanceLinks[targetInstance]`), so the resource's own values are only read from data.fields.
RELATION_KEYS = frozenset({"ports", "instanceLinks"})


def spec_from_cattle_instance(instance: Any) -> VirtualMachine:
    if not isinstance(instance, dict):
        raise SpecError([FieldError("instance", "must be an object")])
    data = instance.get("data") or {}
    data_fields = data.get("fields") if isinstance(data, dict) else None
    if data_fields is not None and not isinstance(data_fields, dict):
        raise SpecError([FieldError("instance.data.fields", "must be an object")])
    merged: dict[str, Any] = {}
    for key in SPEC_KEYS:
        sources = (data_fields or {},) if key in RELATION_KEYS else (data_fields or {}, instance)
        for source in sources:
            if source.get(key) is not None:
                merged[key] = source[key]
    return validate_spec(merged)


def validate_spec(document: Any) -> VirtualMachine:
    """A bare virtualMachine document → model, or SpecError naming every bad field."""
    try:
        return VirtualMachine.model_validate(document)
    except ValidationError as exc:
        raise SpecError.from_validation(exc) from None


def instance_from_event(event: dict) -> dict | None:
    """The instance inside a compute.instance.* event (data.instanceHostMap.instance), if any."""
    data = event.get("data")
    if not isinstance(data, dict):
        return None
    host_map = data.get("instanceHostMap")
    if isinstance(host_map, dict) and isinstance(host_map.get("instance"), dict):
        return host_map["instance"]
    if isinstance(data.get("instance"), dict):
        return data["instance"]
    return None


def spec_from_document(document: Any) -> VirtualMachine:
    """What `herdsman render/validate` accept: a bare virtualMachine, a Cattle instance, or an event."""
    if isinstance(document, dict):
        instance = instance_from_event(document) if "name" in document and "data" in document else None
        if instance is not None:
            return spec_from_cattle_instance(instance)
        if "kind" in document and ("data" in document or "state" in document):
            return spec_from_cattle_instance(document)
    return validate_spec(document)
