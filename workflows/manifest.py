"""Tamper evidence of a backup folder: what the manifest lists, its checksum, its signature.

A capture writes ``manifest.json`` (version 2) last.  Its ``contents`` list
every other file of the folder (disk images, ``domain.xml``, the NVRAM copy)
by name, size and sha256.  The sha256 of the manifest's own bytes goes into
the workflow's record (``result["manifest_sha256"]``), so a folder that
changed after the capture no longer matches what Redis holds.

With ``DOMCAPTURE_MANIFEST_KEY_FILE`` set (a file of at least 32 bytes,
readable only by its owner), the manifest is also signed: HMAC-SHA256 of its
bytes with that key, written beside it as ``manifest.json.sig``.  Someone who
can write both the folder and Redis still cannot forge a backup without the
key.  ``verify`` and ``restore`` check, in this order: the signature (when a
key is configured), the manifest's checksum against the record, then every
file against the manifest, and no file more or less in the folder.

Version 1 manifests (written before this) list only the disk images and have
no checksum in the record: ``verify`` still checks their disks against the
record, but ``restore --define`` refuses them (their ``domain.xml`` is not
covered), and a configured key refuses them outright (they carry no
signature).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import stat
from typing import Any

from .errors import InputError
from .filecopy import opened_nofollow, sha256_file

VERSION = 2
KEY_ENV = "DOMCAPTURE_MANIFEST_KEY_FILE"
SIG_SUFFIX = ".sig"
MIN_KEY_BYTES = 32


class ManifestKeyError(InputError):
    """The configured signing key cannot be used: nothing is signed or trusted with it."""


def load_key(environ: dict[str, str] | None = None) -> bytes | None:
    """The signing key named by ``DOMCAPTURE_MANIFEST_KEY_FILE``, or None when it is not set."""
    env = os.environ if environ is None else environ
    path = env.get(KEY_ENV)
    if not path:
        return None
    try:
        with opened_nofollow(path) as fd:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise ManifestKeyError(f"{KEY_ENV}: {path} is not a regular file")
            if st.st_mode & 0o077:
                raise ManifestKeyError(f"{KEY_ENV}: {path} is readable or writable by others (mode "
                                       f"{stat.S_IMODE(st.st_mode):04o}); chmod 600 it")
            key = os.read(fd, 65536).strip()
    except OSError as exc:
        raise ManifestKeyError(f"{KEY_ENV}: cannot read {path}: {exc.strerror}") from None
    if len(key) < MIN_KEY_BYTES:
        raise ManifestKeyError(f"{KEY_ENV}: {path} holds {len(key)} bytes; a key needs at least {MIN_KEY_BYTES}")
    return key


def sign(data: bytes, key: bytes) -> str:
    return "hmac-sha256:" + hmac.new(key, data, hashlib.sha256).hexdigest()


def sig_path(manifest_path: str) -> str:
    return manifest_path + SIG_SUFFIX


def encode(doc: dict[str, Any]) -> bytes:
    """The manifest's bytes: the same document always gives the same bytes (a resumed step rewrites it)."""
    return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()


def entry(folder: str, path: str, sha256: str | None = None) -> dict[str, Any]:
    """One ``contents`` line: name in the folder, size, sha256 (re-read unless already known)."""
    digest = sha256 or sha256_file(path)
    return {"name": os.path.relpath(path, folder), "size": os.path.getsize(path),
            "sha256": digest.removeprefix("sha256:")}


def check_folder(manifest_path: str, expected_sha256: str | None, *, deep: bool = True,
                 key: bytes | None = None) -> list[dict[str, Any]]:
    """Check a backup folder against its manifest and the record's checksum of it.

    ``deep`` re-reads every file; otherwise files larger than 16 MiB (disk
    images) are checked by size only, for a quick check at submit time.  The
    first failed check that makes the rest meaningless (a bad signature, a
    manifest that does not match the record) ends the list.  Every file is
    opened through ``workflows.backupfolder`` (no link followed, no FIFO
    waited on): a symlink, FIFO or device raises its InputError.
    """
    from . import backupfolder  # it reads signatures through this module

    return backupfolder.inspect_folder(manifest_path, expected_sha256, key=key, deep=deep)


def first_failure(checks: list[dict[str, Any]]) -> str | None:
    """One line naming the first file that failed, or None."""
    for c in checks:
        if not c["ok"]:
            return f"{c['path']}: {c['error']}"
    return None
