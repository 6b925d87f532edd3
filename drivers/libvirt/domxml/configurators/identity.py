"""Name, uuid, title, description and herdsman's metadata."""

from __future__ import annotations

import hashlib

from agent.spec.vm import STORED_SPEC_EXCLUDE
from drivers.libvirt.domxml.inputs import RenderInput
from drivers.libvirt.domxml.model import AgentMetadata, Domain


def configure(inp: RenderInput, dom: Domain) -> None:
    spec = inp.spec
    # The instance uuid is both the domain's uuid and its name: unique per host, never renamed
    # when the user renames the VM (the name is the <title>, updated in place).
    dom.name = inp.uuid
    dom.uuid = inp.uuid
    dom.title = spec.name
    dom.description = spec.description
    stored = spec.model_dump(mode="json", by_alias=True, exclude_none=True, exclude=STORED_SPEC_EXCLUDE | {"labels"})
    dom.metadata = AgentMetadata(
        instance_uuid=inp.uuid,
        spec_hash=spec.spec_hash(),
        spec=stored,
        labels=dict(spec.labels),
        userdata_digest=None if spec.userdata is None else hashlib.sha256(spec.userdata.encode()).hexdigest(),
    )
