"""Re-reading what a capture produced and checking it against its record.

Every capture that writes files records them in ``result["files"]`` as
``{disk: {"path", "size", "checksum": "sha256:<hex>"}}``; ``verify_files``
re-reads each one.  A capture with a version 2 manifest (its sha256 in
``result["manifest_sha256"]``) is checked as a whole folder instead
(``workflows.manifest.check_folder``).  A strategy whose capture lives inside libvirt (an
internal snapshot, a checkpoint) supplies its own check in its definition.

A workflow whose effect is an act on the domain, not a thing kept (a restore
of a managed save or of a save capture), keeps nothing to verify: its check
(``nothing_kept``) says what it did and when, from its record, and never
reads the domain now, whose later life (a stop, another capture) says
nothing about whether that act worked.  ``outcome`` tells the three apart:
``verified``, ``failed``, ``nothing-kept`` (``domcapture verify``: exit 0, 1, 5).
"""

from __future__ import annotations

import os
from typing import Any

from . import backupfolder, manifest
from .record import Record

VERIFIED, FAILED, NOTHING_KEPT = "verified", "failed", "nothing-kept"


def nothing_kept(rec: Record, did: str, at: Any) -> list[dict[str, Any]]:
    """The one check of a workflow that kept nothing: what it did, when (``at``, from its record), and
    what it recorded then."""
    return [{"item": "nothing-kept", "ok": True, "nothing_kept": True, "did": did, "at": at,
             "recorded": dict(rec.result)}]


def outcome(checks: list[dict[str, Any]]) -> str:
    if not all(c["ok"] for c in checks):
        return FAILED
    return NOTHING_KEPT if checks and all(c.get("nothing_kept") for c in checks) else VERIFIED


def verify_files(rec: Record) -> list[dict[str, Any]]:
    key = manifest.load_key()
    if rec.result.get("manifest_sha256"):
        return manifest.check_folder(rec.result["manifest"], rec.result["manifest_sha256"], key=key)
    checks = []
    if key is not None and rec.result.get("manifest"):
        checks.append({"item": "manifest", "path": rec.result["manifest"], "ok": False,
                       "error": f"a version 1 manifest carries no signature, and {manifest.KEY_ENV} is set"})
    for disk, info in sorted((rec.result.get("files") or {}).items()):
        check: dict[str, Any] = {"item": disk, "path": info["path"], "expected": info.get("checksum")}
        path = str(info["path"])
        dirfd = backupfolder.open_folder(os.path.dirname(path))  # no link followed, no FIFO waited on
        try:
            fd, st = backupfolder.open_member(dirfd, os.path.dirname(path), os.path.basename(path))
        except backupfolder.BadBackupFile as exc:
            if str(exc) != f"{path}: missing":
                raise
            check.update(ok=False, error="missing")
            checks.append(check)
            continue
        finally:
            os.close(dirfd)
        try:
            actual = f"sha256:{backupfolder.sha256_fd(fd)}"
        finally:
            os.close(fd)
        check.update(actual=actual, size=st.st_size, ok=actual == info.get("checksum") and
                     (info.get("size") is None or st.st_size == info["size"]))
        if not check["ok"]:
            check["error"] = "checksum or size differs"
        checks.append(check)
    return checks
