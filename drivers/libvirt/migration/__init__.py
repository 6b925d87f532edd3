"""Live migration between libvirt hosts: small pieces, each usable and tested on its own.

- `options`: `MigrationOptions` (policy) and `Destination` (where to), validated models;
- `disks`: which disks a migration copies, which files must already be on the destination;
- `plan`: the migrateToURI3 flags and parameters (`build_call`);
- `monitor`: the pure state machine over jobStats samples (progress, watchdog on bytes moved,
  completion deadline, post-copy switch);
- `outcome`: the verdict from the domain's state on both hosts (`decide`, `read_side`);
- `limits`: the per-host cap on concurrent outgoing migrations (`MigrationSlots`);
- `volumes`, `destination`: prepare the destination over both libvirt connections, and undo;
- `sockets`: free a source an aborted disk copy froze behind a dead link;
- `runner`: one migration from start to verdict (`migrate`), using all of the above.
"""
