"""A direct backup's chain, as every restore kind reads it (restore, mount, instant-restore).

This is the one place that reads what a backup recorded: the workflow record's
result (kind, parent, manifest path, and each disk's file with its size and
checksum).  A change of the manifest's format is absorbed here.
"""

from __future__ import annotations

import os
import stat
from typing import Any, Callable

from .. import backupfolder as bf
from .. import manifest
from ..errors import InputError
from ..filecopy import sha256_file
from ..record import Record

MAX_CHAIN = 1000


def link_of(src: Record) -> dict[str, Any]:
    """What a restore needs of one backup: its id, domain, kind, manifest, and disk -> {path, size, checksum}."""
    # a disk's own kind: a raw, block or network disk is taken whole even in an incremental backup
    files = {disk: {"path": info["path"], "size": info["size"], "checksum": info["checksum"],
                    "kind": "full" if src.result["kind"] == "full" else info.get("kind", "incremental")}
             for disk, info in src.result["files"].items()}
    fw = src.result.get("firmware") or {}
    folder = os.path.dirname(src.result["manifest"])
    return {"id": src.id, "domain": src.domain, "kind": src.result["kind"], "manifest": src.result["manifest"],
            "files": files, "manifest_sha256": src.result.get("manifest_sha256"),
            "firmware": fw.get("copies") or {},
            # each captured TPM file -> its path in a state folder; {} for a capture made before they were recorded
            "tpm_files": {os.path.join(folder, name): rel for name, rel in (fw.get("tpm_files") or {}).items()}}


def backup_chain(load: Callable[[str], Record], ref: Any) -> list[dict[str, Any]]:
    """The chain of backup ``ref`` from the records: the full backup first, ``ref`` last."""
    if not ref:
        raise InputError("--from is required: the id of a succeeded direct-backup")
    chain: list[dict[str, Any]] = []
    wf_id: str | None = str(ref)
    while wf_id:
        src = load(wf_id)
        if src.strategy != "direct-backup":
            raise InputError(f"workflow {wf_id} is a {src.strategy} workflow; --from needs a direct-backup")
        if src.status != "succeeded":
            raise InputError(f"backup {wf_id} is {src.status}; only a succeeded direct-backup can be restored")
        state = (src.data.get("retention") or {}).get("state") or "good"
        if state != "good":
            raise InputError(f"backup {wf_id} is {state} (by prune {(src.data.get('retention') or {}).get('by')}); "
                             "only a good backup can be restored")
        if len(chain) > MAX_CHAIN or any(link["id"] == src.id for link in chain):
            raise InputError(f"the chain of backup {ref} loops at {src.id}")
        chain.insert(0, link_of(src))
        wf_id = src.result.get("parent_backup")
    return chain


def check_chain(chain: list[dict[str, Any]], ref: Any, domain: str | None = None) -> set[str]:
    """The chain starts with a full backup, every link holds the same disks and its files are there with
    their recorded sizes; returns the disks."""
    if not chain:
        raise InputError("--from is required: the id of a succeeded direct-backup")
    if chain[0]["kind"] != "full":
        raise InputError(f"the chain of backup {ref} does not start with a full backup")
    disks = set(chain[-1]["files"])
    for link in chain:
        if domain is not None and link["domain"] != domain:
            raise InputError(f"backup {link['id']} is of domain {link['domain']}, not {domain}")
        if set(link["files"]) != disks:
            raise InputError(f"backup {link['id']} holds disks {sorted(link['files'])}, the chain {sorted(disks)}")
        for disk, info in link["files"].items():
            try:  # never through a link: a symlink, FIFO or device is refused, not followed
                st = os.lstat(info["path"])
            except FileNotFoundError:
                raise InputError(f"backup {link['id']}: its {disk} file {info['path']} is missing") from None
            if not stat.S_ISREG(st.st_mode):
                raise InputError(f"backup {link['id']}: its {disk} file {info['path']} is "
                                 f"{bf.kind_of(st.st_mode)}, not a regular file; refusing to open it")
            if st.st_size != info["size"]:
                raise InputError(f"backup {link['id']}: its {disk} file {info['path']} changed size")
    return disks


def open_chain(chain: list[dict[str, Any]], *, disks: set[str] | None = None, define: bool = False,
               deep: bool = True, known: dict[str, Any] | None = None) -> bf.Opened:
    """Every folder of the chain opened and checked (``workflows/backupfolder.py``): signature, manifest
    against the record, each file against the manifest and the record, no file more, no link, FIFO or
    device; each disk's qcow2 headers name only their own chain.  The files stay open in the result: use
    them through it (``proc``, ``read``), then close it.  A refusal is an InputError naming the file.

    ``deep=False`` (at submit) reads the small files and the disk images' sizes and headers; ``define``:
    the newest link's ``domain.xml`` must be covered (a version 2 manifest).  ``known``: identities a
    previous step of this workflow checked (``Opened.known()``); those files are not read again.
    """
    key = manifest.load_key()
    opened = bf.Opened()
    try:
        for link in chain:
            files = {info["path"]: info for disk, info in link["files"].items() if disks is None or disk in disks}
            for path in files:
                if os.path.dirname(path) != os.path.dirname(link["manifest"]):
                    raise InputError(f"backup {link['id']}: {path} is not in the backup's folder")
            if not link.get("manifest_sha256"):  # a version 1 manifest: its domain.xml is not covered
                if key is not None:
                    raise InputError(f"backup {link['id']} has a version 1 manifest (no signature) and "
                                     f"{manifest.KEY_ENV} is set; refusing to restore it")
                if define and link is chain[-1]:
                    raise InputError(f"backup {link['id']} has a version 1 manifest that does not cover its "
                                     "domain.xml; refusing to --define from it (restore the disks without --define)")
                bf.open_files(files.values(), into=opened, known=known, deep=deep)
                continue
            failed = manifest.first_failure(bf.inspect_folder(
                link["manifest"], link["manifest_sha256"], key=key, deep=deep, known=known, record_files=files,
                into=opened))
            if failed:
                raise InputError(f"backup {link['id']} does not match its manifest: {failed}")
        for disk in sorted(disks if disks is not None else chain[-1]["files"] if chain else []):
            bf.check_chain_headers(opened, files_of(chain, disk))
    except InputError as exc:
        opened.close()
        if isinstance(exc, bf.BadBackupFile) and not str(exc).startswith("backup "):
            owner = next((link["id"] for link in chain
                          if os.path.dirname(exc.path) == os.path.dirname(link["manifest"])), None)
            if owner:
                raise InputError(f"backup {owner}: {exc}") from None
        raise
    except BaseException:
        opened.close()
        raise
    return opened


def refuse_encrypted(chain: list[dict[str, Any]], what: str, opened: bf.Opened) -> None:
    """``mount`` and ``instant-restore`` read a backup in place, without a key: an encrypted one is refused
    (read from the checked files' own headers)."""
    for link in chain:
        for info in link["files"].values():
            if info["path"] in opened.fds and bf.encrypted(opened, info["path"]):
                raise InputError(f"backup {link['id']} is encrypted; {what} reads only unencrypted backups "
                                 "(restore it with --encrypt-key-file instead)")


def pick_disk(disks: set[str], wanted: Any, ref: Any, *, required: bool) -> str | None:
    """``--disk``: one of the backup's disks; without it, the only one (when ``required``) or None."""
    if wanted is None:
        if not required:
            return None
        if len(disks) == 1:
            return next(iter(disks))
        raise InputError(f"backup {ref} holds disks {', '.join(sorted(disks))}; choose one with --disk")
    if wanted not in disks:
        raise InputError(f"--disk {wanted}: backup {ref} holds disks {', '.join(sorted(disks))}")
    return str(wanted)


def files_of(chain: list[dict[str, Any]], disk: str) -> list[str]:
    """The files holding ``disk``, full backup first: from the newest link that holds it whole (a disk
    without a bitmap is taken in full by every backup, so only the newest of its files counts)."""
    start = max((i for i, link in enumerate(chain) if link["files"][disk].get("kind", "full") == "full"
                 or i == 0), default=0)
    return [link["files"][disk]["path"] for link in chain[start:]]


def check_checksums(chain: list[dict[str, Any]], disks: set[str] | None, guard: Callable[[], None]) -> str | None:
    """The first file of the chain (of ``disks``, or all) that does not match its checksum, with its backup."""
    for link in chain:
        for disk, info in link["files"].items():
            if disks is not None and disk not in disks:
                continue
            guard()
            if f"sha256:{sha256_file(info['path'])}" != info["checksum"]:
                return f"backup {link['id']}: {info['path']} does not match its checksum"
    return None
