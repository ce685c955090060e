"""What the backup strategies share to make a folder tamper-evident and to carry UEFI/TPM state.

At preflight, ``plan_firmware`` names a copy of the domain's NVRAM file
(``nvram.fd``) and of each file of its TPM emulator's state (``tpm.<path>``,
the path's folders flattened with ``_``) in the capture folder, before
anything exists; each TPM copy keeps its path relative to the state folder
(``relpath``), which the manifest and the record's result list as
``tpm_files`` (file name in the folder -> relative path) so that a restore
can put it back in place.  ``copy_firmware`` writes them
(checksummed, through our owned-file port), and ``write_manifest`` lists
every file of the folder with size and sha256 in a version 2 manifest,
signed when a key is configured (``workflows.manifest``).  ``result_fields``
puts the manifest's sha256 into the record.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

from .. import manifest
from ..errors import StepFailed
from ..record import Artifact
from ..steps import StepContext

#: artifact kinds whose files a backup folder holds and its manifest lists
CONTENT_KINDS = ("backup-file", "domain-xml", "firmware-copy")
NVRAM_NAME = "nvram.fd"
TPM_FOLDER = "tpm"


def plan_firmware(ctx: StepContext, folder: str) -> None:
    """Record the domain's firmware files and name our copy of each (NVRAM, TPM state) in ``folder``."""
    fw = ctx.hv.firmware(ctx.domain)
    tpm_files: dict[str, str] = {}
    ctx.data["firmware"] = {"nvram": fw.nvram, "nvram_template": fw.nvram_template, "loader": fw.loader,
                            "tpm_state": fw.tpm_state, "tpm_files": tpm_files}
    if fw.nvram:
        art = ctx.rec.plan_artifact(Artifact("firmware:nvram", "firmware-copy", os.path.join(folder, NVRAM_NAME)))
        art["source"] = fw.nvram
    if fw.tpm_state and os.path.isdir(fw.tpm_state):
        for root, _dirs, files in os.walk(fw.tpm_state):
            for name in sorted(f for f in files if f != ".lock"):  # swtpm's lock file holds no state
                src = os.path.join(root, name)
                relpath = os.path.relpath(src, fw.tpm_state)
                rel = relpath.replace(os.sep, "_")
                art = ctx.rec.plan_artifact(Artifact(f"firmware:tpm:{rel}", "firmware-copy",
                                                     os.path.join(folder, f"{TPM_FOLDER}.{rel}")))
                art["source"] = src
                art["relpath"] = relpath
                tpm_files[os.path.basename(art["path"])] = relpath


def copy_firmware(ctx: StepContext, sources: dict[str, str] | None = None) -> None:
    """Copy each planned firmware file into the folder (again from the start after a crash: they are small).

    ``sources``: a restore's copies come from the backup folder's checked open files (path -> name of
    the open file); a source not among them is refused."""
    for art in ctx.rec.artifacts_of("firmware-copy"):
        if art["status"] == "present" and art.get("checksum") and os.path.exists(art["path"]):
            continue
        partial = manifest_partial = art["path"] + ".partial"
        art["partial"] = manifest_partial
        ctx.save("firmware-copy-intent", source=art["source"], path=art["path"])
        src = art["source"] if sources is None else sources.get(art["source"])
        if src is None:
            raise StepFailed(f"{art['source']}: not a checked file of the backup's folder")
        digest, size = ctx.fx.files.copy_resumable(src, partial, art["path"], offset=0,
                                                   on_progress=lambda _done, _total: None,
                                                   on_durable=lambda _pos: None, check=ctx.check_cancel)
        ctx.rec.set_artifact(art["name"], status="present", checksum=f"sha256:{digest}", size=size)
        ctx.save("firmware-copied", path=art["path"])


def remove_firmware(ctx: StepContext) -> None:
    for art in ctx.rec.artifacts_of("firmware-copy"):
        for path in (art["path"], art["path"] + ".partial"):
            ctx.fx.files.remove_owned(path)
        art["status"] = "deleted"


def write_manifest(ctx: StepContext, doc: dict[str, Any]) -> None:
    """Write ``doc`` as the folder's version 2 manifest: every file listed; signed when a key is set.

    The bytes depend only on the record and the files, so a resumed step
    writes the same manifest (and signature) again.
    """
    path: str = ctx.rec.artifacts["manifest"]["path"]
    folder = os.path.dirname(path)
    contents = []
    for art in ctx.rec.artifacts.values():
        if art.get("kind") in CONTENT_KINDS and os.path.exists(art["path"]):
            known = art.get("checksum") if art["kind"] == "backup-file" else None
            contents.append(manifest.entry(folder, art["path"], known))
    data = manifest.encode({**doc, "version": manifest.VERSION,
                            "contents": sorted(contents, key=lambda e: e["name"])})
    key = manifest.load_key()
    if key is not None:
        if "manifest-sig" not in ctx.rec.artifacts:  # a record planned before signatures existed
            ctx.rec.plan_artifact(Artifact("manifest-sig", "manifest-sig", manifest.sig_path(path)))
            ctx.save("plan-signature")
        ctx.fx.files.write_atomic(manifest.sig_path(path), manifest.sign(data, key) + "\n")
    ctx.fx.files.write_atomic(path, data)


def plan_manifest(ctx: StepContext, path: str) -> None:
    ctx.rec.plan_artifact(Artifact("manifest", "manifest", path))
    ctx.rec.plan_artifact(Artifact("manifest-sig", "manifest-sig", manifest.sig_path(path)))


def remove_manifest(ctx: StepContext) -> None:
    for name in ("manifest", "manifest-sig"):
        art = ctx.rec.artifacts.get(name)
        if art:
            for path in (art["path"], art["path"] + ".partial"):
                ctx.fx.files.remove_owned(path)
            art["status"] = "deleted"


def result_fields(ctx: StepContext) -> dict[str, Any]:
    """What the record keeps of the manifest: its sha256 (what verify and restore check), whether signed."""
    path: str = ctx.rec.artifacts["manifest"]["path"]
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    signed = os.path.exists(manifest.sig_path(path))
    if signed:
        ctx.rec.set_artifact("manifest-sig", status="present")
    fw = ctx.data.get("firmware") or {}
    return {"manifest_sha256": digest, "manifest_version": manifest.VERSION, "signed": signed,
            "firmware": {"nvram": fw.get("nvram"), "nvram_template": fw.get("nvram_template"),
                         "tpm_state": fw.get("tpm_state"),
                         "copies": {a["name"].removeprefix("firmware:"): a["path"]
                                    for a in ctx.rec.artifacts_of("firmware-copy")},
                         # where each TPM copy goes back in a state folder (absent in captures made before)
                         "tpm_files": {os.path.basename(a["path"]): a["relpath"]
                                       for a in ctx.rec.artifacts_of("firmware-copy") if a.get("relpath")}}}


def rewrite_manifest(ctx: StepContext, path: str, doc: dict[str, Any], changed: dict[str, str]) -> str | None:
    """Write a kept backup's manifest again (a prune changed its chain or rewrote its files).

    ``changed``: path -> "sha256:<hex>" of each file that was rewritten; its
    ``contents`` line takes the new size and checksum, the others stay.  A
    version 2 manifest is signed again when a key is set; returns its new
    sha256 for the record (None for a version 1 manifest, which has none).
    """
    if doc.get("version") != manifest.VERSION:
        ctx.fx.files.write_atomic(path, doc)
        return None
    folder = os.path.dirname(path)
    contents = [manifest.entry(folder, os.path.join(folder, e["name"]), changed[os.path.join(folder, e["name"])])
                if os.path.join(folder, e["name"]) in changed else e for e in doc.get("contents", [])]
    data = manifest.encode({**doc, "contents": sorted(contents, key=lambda e: str(e["name"]))})
    key = manifest.load_key()
    if key is not None:
        ctx.fx.files.write_atomic(manifest.sig_path(path), manifest.sign(data, key) + "\n")
    ctx.fx.files.write_atomic(path, data)
    return hashlib.sha256(data).hexdigest()


def signed_without_key(path: str) -> bool:
    """A signed manifest that cannot be signed again here (no key configured): a prune must not rewrite it."""
    return os.path.exists(manifest.sig_path(path)) and manifest.load_key() is None

