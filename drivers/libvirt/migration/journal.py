"""What an outgoing migration left to finish, kept on disk while it runs.

libvirt carries on a peer-to-peer migration when the client that asked for it dies, so an agent
killed mid-migration comes back to a VM that is still moving, has moved, or failed to move, and
to files it prepared on the destination. One small JSON file per migration,
`<state dir>/migrations/<uuid>.json` (0600 in a 0700 folder, replaced atomically), says where
the VM was going, with which options, and what was made there. It is written once the
destination is prepared and removed when the migration's end has been dealt with (the source's
files purged after a move, the destination's removed after a failure), so a restarted agent
can finish the job (service.recover).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil

from drivers.libvirt.migration.destination import Created, Prepared
from drivers.libvirt.migration.options import Destination, MigrationOptions

FOLDER = "migrations"
_log = logging.getLogger("herdsman.migration")


@dataclass(frozen=True)
class Owner:
    """The process running the migration (pid and start time: a pid alone may be reused)."""

    pid: int
    started: float

    @classmethod
    def current(cls) -> Owner:
        return cls(os.getpid(), psutil.Process().create_time())

    def alive_elsewhere(self) -> bool:
        """Another process that still runs (`herdsman migrate` beside the agent): not ours to finish."""
        if self.pid == os.getpid():
            return False
        try:
            return psutil.Process(self.pid).create_time() == self.started
        except psutil.Error:
            return False


@dataclass(frozen=True)
class Entry:
    uuid: str
    destination: Destination
    host_uuid: str | None  # the destination's herdsman host uuid, when the controller named it
    options: MigrationOptions
    prepared: Prepared
    owner: Owner

    def to_json(self) -> str:
        return json.dumps({
            "uuid": self.uuid, "destination": self.destination.model_dump(mode="json"), "hostUuid": self.host_uuid,
            "options": self.options.model_dump(mode="json"),
            "prepared": {"created": [asdict(c) for c in self.prepared.created],
                         "copiedBytes": self.prepared.copied_bytes},
            "owner": {"pid": self.owner.pid, "started": self.owner.started},
        }, indent=1)

    @classmethod
    def from_json(cls, text: str) -> Entry:
        body: dict[str, Any] = json.loads(text)
        prepared = body["prepared"]
        return cls(uuid=str(body["uuid"]), destination=Destination.model_validate(body["destination"]),
                   host_uuid=body.get("hostUuid"), options=MigrationOptions.model_validate(body["options"]),
                   prepared=Prepared(created=[Created(**c) for c in prepared["created"]],
                                     copied_bytes=int(prepared["copiedBytes"])),
                   owner=Owner(int(body["owner"]["pid"]), float(body["owner"]["started"])))


class Journal:
    def __init__(self, state_dir: Path) -> None:
        self.folder = state_dir / FOLDER

    def path(self, uuid: str) -> Path:
        return self.folder / f"{uuid}.json"

    def write(self, entry: Entry) -> None:
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        target = self.path(entry.uuid)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(entry.to_json())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def remove(self, uuid: str) -> None:
        self.path(uuid).unlink(missing_ok=True)

    def entries(self) -> list[Entry]:
        """Every readable entry. An unreadable one is logged and kept for an operator, never
        guessed at: acting on half a record could remove the wrong files."""
        found = []
        for path in sorted(self.folder.glob("*.json")) if self.folder.is_dir() else []:
            try:
                entry = Entry.from_json(path.read_text())
            except (OSError, ValueError, KeyError, TypeError) as exc:  # pydantic's ValidationError is a ValueError
                _log.error("unreadable migration journal entry left in place",
                           extra={"path": str(path), "error": str(exc)})
                continue
            if entry.uuid != path.stem:
                _log.error("migration journal entry names another VM; left in place",
                           extra={"path": str(path), "uuid": entry.uuid})
                continue
            found.append(entry)
        return found
