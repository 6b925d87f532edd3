"""Where a VM's files live on the host, derived only from ids the agent controls.

Nothing here takes a path from a user: volume names come from the instance uuid and the
validated disk name, image cache entries from a digest of the image URL.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class HostLayout:
    state_dir: Path = Path("/var/lib/herdsman")
    log_dir: Path = Path("/var/log/herdsman")
    storage_pool: str = "herdsman"

    def seed_path(self, instance_uuid: str) -> Path:
        return self.state_dir / "seeds" / f"{instance_uuid}.iso"

    def console_log_path(self, instance_uuid: str) -> Path:
        return self.log_dir / "console" / f"{instance_uuid}.log"

    @staticmethod
    def volume_name(instance_uuid: str, disk_name: str, fmt: str) -> str:
        return f"{instance_uuid}-{disk_name}.{fmt}"

    @staticmethod
    def image_key(url: str) -> str:
        return hashlib.sha256(url.encode()).hexdigest()[:24]

    def kernel_dir(self, manifest_url: str) -> Path:
        return self.state_dir / "kernels" / self.image_key(manifest_url)
