"""The capture strategies, by CLI name."""

from __future__ import annotations

from ..definition import Definition
from ..errors import UnknownStrategy
from . import group_backup, snapshot_backup
from . import checkpoint, direct_backup, instant_restore, mount, prune, restore
from . import snapshot, snapshot_delete, snapshot_revert
from . import managed_save, managed_save_restore, save, save_restore

DEFINITIONS: dict[str, Definition] = {
    snapshot_backup.NAME: snapshot_backup.DEFINITION,
    direct_backup.NAME: direct_backup.DEFINITION,
    group_backup.NAME: group_backup.DEFINITION,
    checkpoint.NAME: checkpoint.DEFINITION,
    restore.NAME: restore.DEFINITION,
    prune.NAME: prune.DEFINITION,
    instant_restore.NAME: instant_restore.DEFINITION,
    mount.NAME: mount.DEFINITION,
    mount.UNMOUNT: mount.UNMOUNT_DEFINITION,
    snapshot.NAME: snapshot.DEFINITION,
    snapshot_revert.NAME: snapshot_revert.DEFINITION,
    snapshot_delete.NAME: snapshot_delete.DEFINITION,
    managed_save.NAME: managed_save.DEFINITION,
    managed_save_restore.NAME: managed_save_restore.DEFINITION,
    save.NAME: save.DEFINITION,
    save_restore.NAME: save_restore.DEFINITION,
}


def get(name: str) -> Definition:
    try:
        return DEFINITIONS[name]
    except KeyError:
        raise UnknownStrategy(f"unknown strategy {name!r}; choose one of: {', '.join(sorted(DEFINITIONS))}") from None
