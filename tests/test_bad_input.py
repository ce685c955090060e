"""Bad input, across every subcommand and strategy: refused in one line, and nothing changed.

Each case runs the real ``domcapture`` command and asserts: the documented
non-zero exit code, exactly one line on stderr naming the problem, no
traceback, nothing on stdout, and no side effect at all: every Redis key
under the deployment's prefix (RQ's included: they live under it) is the same
byte for byte (``DUMP``), no other key names the prefix or queue, the target
folder and the domain's folder hold the same files, and libvirt shows the
same domains, the same snapshots and checkpoints, the domain in the same
state on the same disks.

The README's "Bad input" table counts these cases by subcommand
(``python -m tests.test_bad_input`` prints it).
"""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest

from workflows.record import Record, new_id
from workflows.store import Store

from .realenv import DOMCAPTURE, DiskDomain

pytestmark = pytest.mark.real

REPO = Path(__file__).resolve().parent.parent
TAG = uuid.uuid4().hex[:6]
DEFINE = f"dctest-bad-{TAG}"  # a --define name no case may create
GHOST = "0123456789abcdef"  # a well-formed id no record has
NL = "a\nb"

# (argv, extra environment, exit code, a fragment of the one stderr line)
# Placeholders: {dom} a running test domain, {target} an empty folder, {file} a
# regular file, {strkey} an id whose record key is a Redis string (WRONGTYPE
# for a hash read), {foreign} a succeeded snapshot-backup record, {queued} a
# queued record.
SB = ["submit", "snapshot-backup", "--domain", "{dom}", "--target", "{target}"]
DB = ["submit", "direct-backup", "--domain", "{dom}", "--target", "{target}"]
SNAP = ["submit", "snapshot", "--domain", "{dom}"]
SAVE = ["submit", "save", "--domain", "{dom}", "--target", "{target}"]

CASES: list[tuple[str, list[str], dict[str, str], int, str]] = [
    # -- global flags and the environment ------------------------------------------------------
    ("global", ["--log-level", "bogus", "list"], {}, 2, "--log-level must be one of"),
    ("global", ["--log-level", "", "list"], {}, 2, "--log-level must be one of"),
    ("global", ["--redis-url", "http://127.0.0.1:6379/0", "list"], {}, 2, "must start with redis://"),
    ("global", ["--redis-url", "redis://127.0.0.1:99999/0", "list"], {}, 2, "Port out of range"),
    ("global", ["--redis-url", "redis://127.0.0.1:abc/0", "list"], {}, 2, "Port could not be cast"),
    ("global", ["--redis-url", "redis://127.0.0.1:6379/x", "list"], {}, 2, "database index 'x'"),
    ("global", ["--redis-url", "redis://127.0.0.1:6379/999", "list"], {}, 2, "DB index is out of range"),
    ("global", ["--redis-url", "redis://:secret@127.0.0.1:6379/0", "list"], {}, 2, "must not carry a password"),
    ("global", ["--redis-url", "", "list"], {}, 2, "--redis-url must not be empty"),
    ("global", ["--redis-url", "redis+sentinel://127.0.0.1:26379", "list"], {}, 2, "names no service"),
    ("global", ["--redis-url", "redis+sentinel://127.0.0.1:0/dcha", "list"], {}, 2, "port 0 is out of range"),
    ("global", ["--redis-url", "redis+sentinel://h1,h1/dcha", "list"], {}, 2, "names sentinel h1 twice"),
    ("global", ["--redis-url", "redis+sentinel://h1/dcha/x", "list"], {}, 2, "database index 'x'"),
    ("global", ["--redis-url", "redis+sentinel://h1/dc ha", "list"], {}, 2, "service 'dc ha' must be"),
    ("global", ["--redis-url", "redis+sentinel://h1/dcha?ssl_ca_certs=/x", "list"], {}, 2,
     "needs rediss+sentinel://"),
    ("global", ["--redis-url", "redis+sentinel://:pw@h1/dcha", "list"], {}, 2, "must not carry a password"),
    ("env", ["list"], {"DOMCAPTURE_REDIS_URL": "redis+sentinel://h1;rm/dcha"}, 2,
     "'h1;rm' is not a sentinel host[:port]"),
    ("env", ["list"], {"DOMCAPTURE_REDIS_REPLICA_ACKS": "one"}, 2, "DOMCAPTURE_REDIS_REPLICA_ACKS must be"),
    ("env", ["list"], {"DOMCAPTURE_REDIS_ACK_TIMEOUT": "4"}, 2, "must be at most half the lease TTL"),
    ("env", ["list"], {"DOMCAPTURE_REDIS_FAILOVER_WAIT": "0"}, 2, "DOMCAPTURE_REDIS_FAILOVER_WAIT must be"),
    ("global", [], {}, 2, "the following arguments are required: COMMAND"),
    ("global", ["explode"], {}, 2, "invalid choice: 'explode'"),
    ("global", ["--bogus", "list"], {}, 2, "unrecognized arguments: --bogus"),
    ("env", ["list"], {"DOMCAPTURE_LEASE_TTL": "abc"}, 2, "DOMCAPTURE_LEASE_TTL must be a number"),
    ("env", ["list"], {"DOMCAPTURE_LEASE_TTL": "nan"}, 2, "DOMCAPTURE_LEASE_TTL must be a finite number"),
    ("env", ["list"], {"DOMCAPTURE_LEASE_TTL": "0"}, 2, "DOMCAPTURE_LEASE_TTL must be at least 0.5"),
    ("env", ["list"], {"DOMCAPTURE_LEASE_TTL": "-5"}, 2, "DOMCAPTURE_LEASE_TTL must be at least 0.5"),
    ("env", ["recovery", "--once"], {"DOMCAPTURE_RECOVERY_INTERVAL": "inf"}, 2,
     "DOMCAPTURE_RECOVERY_INTERVAL must be a finite number"),
    ("env", ["list"], {"DOMCAPTURE_PREFIX": ""}, 2, "DOMCAPTURE_PREFIX must not be empty"),
    ("env", ["list"], {"DOMCAPTURE_PREFIX": "dc x"}, 2, "DOMCAPTURE_PREFIX 'dc x' must be letters"),
    ("env", ["list"], {"DOMCAPTURE_QUEUE": "q\n"}, 2, "DOMCAPTURE_QUEUE must not contain control characters"),
    ("env", ["list"], {"DOMCAPTURE_REDIS_URL": "ftp://127.0.0.1/0"}, 2, "DOMCAPTURE_REDIS_URL must start with"),
    ("env", ["list"], {"DOMCAPTURE_REDIS_PASSWORD": "secret"}, 2, "lets anyone read the deployment's keys"),
    ("env", ["list"], {"DOMCAPTURE_REDIS_PASSWORD_FILE": "/nonexistent/pw"}, 2, "cannot read /nonexistent/pw"),
    ("env", ["list"], {"DOMCAPTURE_REDIS_PASSWORD_FILE": "{file}", "DOMCAPTURE_REDIS_PASSWORD": "x"}, 2,
     "not both"),
    ("env", ["list"], {"DOMCAPTURE_REDIS_PASSWORD": ""}, 2, "DOMCAPTURE_REDIS_PASSWORD must not be empty"),
    ("env", ["worker", "--burst"], {"DOMCAPTURE_RUN_DIR": "/run/x\ny"}, 2,
     "DOMCAPTURE_RUN_DIR must not contain control characters"),
    ("env", ["worker", "--burst"], {"DOMCAPTURE_FAULT": "explode"}, 2, "DOMCAPTURE_FAULT must look like kill-at:"),
    # -- submit: every strategy ------------------------------------------------------------------
    ("submit", ["submit"], {}, 2, "the following arguments are required: STRATEGY"),
    ("submit", ["submit", "nope", "--domain", "{dom}"], {}, 2, "unknown strategy 'nope'"),
    ("submit", ["submit", "snapshot-backup", "--target", "{target}"], {}, 2, "required: --domain"),
    ("submit", [*SB[:3], "dctest-missing-domain", *SB[4:]], {}, 2, "Domain not found"),
    ("submit", [*SB[:3], NL, *SB[4:]], {}, 2, "--domain must not contain control characters"),
    ("submit", [*SB[:3], "", *SB[4:]], {}, 2, "--domain must not be empty"),
    ("submit", [*SB, "--uri", "qemu+unix:///system?socket=/run/libvirt/domcapture-nonexistent-sock"], {}, 4,
     "cannot connect to libvirt"),
    ("submit", [*SB, "--uri", ""], {}, 2, "--uri must not be empty"),
    ("submit", [*SB, "--wait", "--timeout", "-1"], {}, 2, "--timeout must be positive"),
    ("submit", [*SB, "--wait", "--timeout", "nan"], {}, 2, "--timeout must be a finite number"),
    ("submit", [*SB, "--wait", "--timeout", "soon"], {}, 2, "--timeout must be a number"),
    ("submit", ["--redis-url", "redis://127.0.0.1:1/0", *SB], {}, 4, "redis unreachable"),
    ("snapshot-backup", SB[:4], {}, 2, "--target is required"),
    ("snapshot-backup", [*SB[:5], "{target}/absent"], {}, 2, "does not exist"),
    ("snapshot-backup", [*SB[:5], "{file}"], {}, 2, "does not exist"),
    ("snapshot-backup", [*SB[:5], "{target}\nx"], {}, 2, "--target must not contain control characters"),
    ("snapshot-backup", [*SB[:5], "{shared}"], {}, 2, "is writable by others (mode 0777) without the sticky"),
    ("snapshot-backup", [*SB[:5], "{groupw}"], {}, 2, "is writable by its group (mode 0770) without the sticky"),
    ("snapshot-backup", [*SB[:5], "{lent}"], {}, 2, "is owned by uid 65534, not by root or this user"),
    ("snapshot-backup", [*SB[:5], "{shared}/inner"], {}, 2, "shared is writable by others (mode 0777)"),
    ("snapshot-backup", [*SB[:5], ""], {}, 2, "--target must not be empty"),
    ("snapshot-backup", [*SB, "--quiesce", "maybe"], {}, 2, "--quiesce must be one of off, try, require"),
    ("snapshot-backup", [*SB, "--on-error", "ignore"], {}, 2, "--on-error must be one of rollback, stop"),
    ("snapshot-backup", [*SB, "--freeze-deadline", "nan"], {}, 2, "--freeze-deadline must be a finite number"),
    ("snapshot-backup", [*SB, "--freeze-deadline", "inf"], {}, 2, "--freeze-deadline must be a finite number"),
    ("snapshot-backup", [*SB, "--freeze-deadline", "0"], {}, 2, "--freeze-deadline must be positive"),
    ("snapshot-backup", [*SB, "--freeze-deadline", "-3"], {}, 2, "--freeze-deadline must be positive"),
    ("snapshot-backup", [*SB, "--commit-timeout", "inf"], {}, 2, "--commit-timeout must be a finite number"),
    ("snapshot-backup", [*SB, "--commit-timeout", "1e400"], {}, 2, "--commit-timeout must be a finite number"),
    ("snapshot-backup", [*SB, "--commit-timeout", "ten"], {}, 2, "--commit-timeout must be a number"),
    ("snapshot-backup", [*SB, "--bandwidth", "inf"], {}, 2, "--bandwidth must look like"),
    ("snapshot-backup", [*SB, "--bandwidth", "0.5"], {}, 2, "at least 1 byte/s"),
    ("snapshot-backup", [*SB, "--bandwidth=-5M"], {}, 2, "--bandwidth must look like"),
    ("snapshot-backup", [*SB, "--bandwidth", "fast"], {}, 2, "--bandwidth must look like"),
    ("snapshot-backup", [*SB, "--bandwidth", "nan"], {}, 2, "--bandwidth must look like"),
    ("snapshot-backup", [*SB, "--bandwidth", "99999999T"], {}, 2, "--bandwidth must be at most"),
    ("snapshot-backup", [*SB, "--action", "create"], {}, 2, "unrecognized arguments: --action"),
    ("direct-backup", [*DB[:5], "{lentsticky}"], {}, 2, "is owned by uid 65534, not by root or this user"),
    ("direct-backup", DB[:4], {}, 2, "--target is required"),
    ("direct-backup", [*DB, "--mode", "sideways"], {}, 2, "--mode must be one of push, pull"),
    ("direct-backup", [*DB, "--backup-timeout", "0"], {}, 2, "--backup-timeout must be positive"),
    ("direct-backup", [*DB, "--backup-timeout", "nan"], {}, 2, "--backup-timeout must be a finite number"),
    ("direct-backup", [*DB, "--freeze-deadline", "inf"], {}, 2, "--freeze-deadline must be a finite number"),
    ("direct-backup", [*DB, "--quiesce", ""], {}, 2, "--quiesce must not be empty"),
    ("direct-backup", [*DB, "--bandwidth", "1M"], {}, 2, "unrecognized arguments: --bandwidth"),
    ("direct-backup", [*DB, "--mode", "pull", "--compress", "lz4"], {}, 2, "--compress must be one of zstd"),
    ("direct-backup", [*DB, "--compress", "zstd"], {}, 2, "--compress needs --mode pull"),
    ("direct-backup", [*DB, "--mode", "push", "--compress", "zstd"], {}, 2, "--compress needs --mode pull"),
    ("direct-backup", [*DB, "--mode", "pull", "--encrypt-key-file", "{target}/absent"], {}, 2,
     "absent: no such file or directory"),
    ("direct-backup", [*DB, "--mode", "pull", "--encrypt-key-file", "{target}"], {}, 2, "is not a regular file"),
    ("direct-backup", [*DB, "--mode", "pull", "--encrypt-key-file", ""], {}, 2, "--encrypt-key-file must not be empty"),
    ("direct-backup", [*DB, "--encrypt-key-file", "{file}"], {}, 2, "--encrypt-key-file needs --mode pull"),
    ("direct-backup", [*DB, "--mode", "pull", "--compress", "zstd", "--encrypt-key-file", "{file}"], {}, 2,
     "--compress and --encrypt-key-file are not offered together"),
    ("checkpoint", ["submit", "checkpoint", "--domain", "{dom}", "--action", "explode"], {}, 2,
     "--action must be one of create, delete, redefine"),
    ("checkpoint", ["submit", "checkpoint", "--domain", "{dom}", "--action", "delete"], {}, 2,
     "--checkpoint is required with --action delete"),
    ("checkpoint", ["submit", "checkpoint", "--domain", "{dom}", "--action", "delete", "--checkpoint", "nope"], {}, 2,
     "has no checkpoint named 'nope'"),
    ("checkpoint", ["submit", "checkpoint", "--domain", "{dom}", "--checkpoint", "c1"], {}, 2,
     "does not take one"),
    ("checkpoint", ["submit", "checkpoint", "--domain", "{dom}", "--children"], {}, 2,
     "--children applies to --action delete"),
    ("checkpoint", ["submit", "checkpoint", "--domain", "{dom}", "--action", "delete", "--checkpoint", NL], {}, 2,
     "--checkpoint must not contain control characters"),
    ("restore", ["submit", "restore", "--domain", "{dom}", "--target", "{target}"], {}, 2, "--from is required"),
    ("restore", ["submit", "restore", "--domain", "{dom}", "--from", "latest"], {}, 2,
     "--from: 'latest' is not a workflow id"),
    ("restore", ["submit", "restore", "--domain", "{dom}", "--from", "{strkey}:history"], {}, 2,
     "is not a workflow id"),
    ("restore", ["submit", "restore", "--domain", "{dom}", "--from", GHOST], {}, 2, "no workflow with id"),
    ("restore", ["submit", "restore", "--domain", "{dom}", "--from", "{strkey}"], {}, 3,
     "is a Redis string, not a workflow record"),
    ("restore", ["submit", "restore", "--domain", "{dom}", "--from", "{foreign}"], {}, 2,
     "--from needs a direct-backup"),
    ("restore", ["submit", "restore", "--domain", "{dom}", "--from", "{foreign}", "--define", ""], {}, 2,
     "--define must not be empty"),
    ("restore", ["submit", "restore", "--domain", "{dom}", "--from", "{foreign}", "--define", NL], {}, 2,
     "--define must not contain control characters"),
    ("snapshot", [*SNAP, "--kind", "both"], {}, 2, "--kind must be one of internal, external"),
    ("snapshot", [*SNAP, "--name", "bad name!"], {}, 2, "is not a valid snapshot name"),
    ("snapshot", [*SNAP, "--name", ""], {}, 2, "--name must not be empty"),
    ("snapshot", [*SNAP, "--target", "{target}"], {}, 2, "--target applies to --kind external"),
    ("snapshot", [*SNAP, "--kind", "external", "--target", "{target}", "--freeze-deadline", "-1"], {}, 2,
     "--freeze-deadline must be positive"),
    ("snapshot", [*SNAP, "--kind", "external", "--target", "{target}", "--commit-timeout", "0"], {}, 2,
     "--commit-timeout must be positive"),
    ("snapshot", [*SNAP, "--kind", "external", "--target", "{target}", "--quiesce", "often"], {}, 2,
     "--quiesce must be one of"),
    ("snapshot-revert", ["submit", "snapshot-revert", "--domain", "{dom}"], {}, 2, "--name is required"),
    ("snapshot-revert", ["submit", "snapshot-revert", "--domain", "{dom}", "--name", "nosuch"], {}, 2, "nosuch"),
    ("snapshot-revert", ["submit", "snapshot-revert", "--domain", "{dom}", "--name", NL], {}, 2,
     "--name must not contain control characters"),
    ("snapshot-delete", ["submit", "snapshot-delete", "--domain", "{dom}"], {}, 2, "--name is required"),
    ("snapshot-delete", ["submit", "snapshot-delete", "--domain", "{dom}", "--name", "nosuch"], {}, 2, "nosuch"),
    ("snapshot-delete", ["submit", "snapshot-delete", "--domain", "{dom}", "--name", "s", "--commit-timeout", "nan"],
     {}, 2, "--commit-timeout must be a finite number"),
    ("managed-save", ["submit", "managed-save", "--domain", "{dom}", "--on-error", "maybe"], {}, 2,
     "--on-error must be one of"),
    ("managed-save", ["submit", "managed-save", "--domain", "dctest-missing-domain"], {}, 2, "Domain not found"),
    ("managed-save", ["submit", "managed-save", "--domain", "{dom}", "--target", "{target}"], {}, 2,
     "unrecognized arguments: --target"),
    ("managed-save-restore", ["submit", "managed-save-restore", "--domain", "{dom}"], {}, 2,
     "only a shut off domain is restored"),
    ("managed-save-restore", ["submit", "managed-save-restore", "--domain", "{dom}", "--on-error", ""], {}, 2,
     "--on-error must not be empty"),
    ("save", SAVE[:4], {}, 2, "--target is required"),
    ("save", [*SAVE, "--bandwidth", "0.5"], {}, 2, "at least 1 byte/s"),
    ("save", [*SAVE, "--bandwidth", "inf"], {}, 2, "--bandwidth must look like"),
    ("save", [*SAVE[:5], "relative/absent"], {}, 2, "does not exist"),
    ("save-restore", ["submit", "save-restore", "--domain", "{dom}"], {}, 2, "--from is required"),
    ("save-restore", ["submit", "save-restore", "--domain", "{dom}", "--from", "ABCDEF0123456789"], {}, 2,
     "is not a workflow id"),
    ("save-restore", ["submit", "save-restore", "--domain", "{dom}", "--from", GHOST], {}, 2, "no workflow with id"),
    ("save-restore", ["submit", "save-restore", "--domain", "{dom}", "--from", "{foreign}"], {}, 2,
     "--from needs a save capture"),
    ("save-restore", ["submit", "save-restore", "--domain", "{dom}", "--from", "{foreign}", "--bandwidth", "nan"],
     {}, 2, "--bandwidth must look like"),
    # -- the other commands --------------------------------------------------------------------
    ("list", ["list", "--status", "bogus"], {}, 2, "invalid choice: 'bogus'"),
    ("list", ["list", "extra"], {}, 2, "unrecognized arguments: extra"),
    ("show", ["show", "{strkey}:history"], {}, 2, "is not a workflow id"),
    ("show", ["show", "xyz"], {}, 2, "'xyz' is not a workflow id"),
    ("show", ["show", GHOST], {}, 2, "no workflow with id"),
    ("show", ["show"], {}, 2, "required: id"),
    ("resume", ["resume", "../etc"], {}, 2, "is not a workflow id"),
    ("resume", ["resume", GHOST], {}, 2, "no workflow with id"),
    ("resume", ["resume", "{strkey}"], {}, 3, "is a Redis string"),
    ("resume", ["resume", "{foreign}"], {}, 3, "is succeeded; nothing to do"),
    ("rollback", ["rollback", "{strkey}:epoch"], {}, 2, "is not a workflow id"),
    ("rollback", ["rollback", GHOST], {}, 2, "no workflow with id"),
    ("rollback", ["rollback", "{foreign}", "--wait", "--timeout", "inf"], {}, 2, "--timeout must be a finite"),
    ("abort", ["abort", "{strkey}"], {}, 3, "is a Redis string"),
    ("abort", ["abort", "{strkey}:history"], {}, 2, "is not a workflow id"),
    ("abort", ["abort", GHOST], {}, 2, "no workflow with id"),
    ("abort", ["abort", "{foreign}"], {}, 3, "nothing to abort"),
    ("wait", ["wait", "{foreign}", "--timeout", "nan"], {}, 2, "--timeout must be a finite number"),
    ("wait", ["wait", "{foreign}", "--timeout", "0"], {}, 2, "--timeout must be positive"),
    ("wait", ["wait", GHOST], {}, 2, "no workflow with id"),
    ("verify", ["verify", "{queued}"], {}, 3, "only a succeeded capture can be verified"),
    ("verify", ["verify", "not-an-id"], {}, 2, "is not a workflow id"),
    ("verify", ["verify", GHOST], {}, 2, "no workflow with id"),
    ("worker", ["--redis-url", "redis://127.0.0.1:1/0", "worker", "--burst"], {}, 4, "redis unreachable"),
    ("worker", ["worker", "--burst", "--queue", "x"], {}, 2, "unrecognized arguments: --queue"),
    ("worker", ["worker"], {"DOMCAPTURE_LEASE_TTL": "inf"}, 2, "DOMCAPTURE_LEASE_TTL must be a finite number"),
    ("recovery", ["recovery", "--interval", "-1"], {}, 2, "--interval must be at least 0.05"),
    ("recovery", ["recovery", "--interval", "nan"], {}, 2, "--interval must be a finite number"),
    ("recovery", ["recovery", "--interval", "0"], {}, 2, "--interval must be at least 0.05"),
    ("recovery", ["--redis-url", "redis://127.0.0.1:1/0", "recovery", "--once"], {}, 4, "redis unreachable"),
    ("prune", ["submit", "prune", "--domain", "{dom}"], {}, 2, "a prune needs a retention"),
    ("prune", ["submit", "prune", "--domain", "{dom}", "--keep-last", "0"], {}, 2, "a prune needs a retention"),
    ("prune", ["submit", "prune", "--domain", "{dom}", "--keep-daily", "many"], {}, 2,
     "--keep-daily must be a whole number"),
    ("prune", ["submit", "prune", "--domain", "{dom}", "--keep-weekly", "-3"], {}, 2,
     "--keep-weekly must be a whole number >= 0"),
    ("prune", ["submit", "prune", "--domain", "{dom}", "--keep-last", "1", "--timezone", "Mars/Base"], {}, 2,
     "'Mars/Base' is not a known time zone"),
    ("prune", ["submit", "prune", "--domain", "{dom}", "--keep-last", "1", "--target", "{target}/absent"], {}, 2,
     "does not exist"),
    ("prune", ["submit", "prune", "--domain", "dctest-missing-domain", "--keep-last", "1"], {}, 2,
     "is not defined"),
    ("prune", ["submit", "prune", "--domain", "{dom}", "--policy", "nope"], {}, 2, "no policy named 'nope'"),
    ("instant-restore", ["submit", "instant-restore", "--domain", "{dom}", "--from", GHOST, "--define", "x"], {}, 2,
     "no workflow with id"),
    ("instant-restore", ["submit", "instant-restore", "--domain", "{dom}", "--from", "{foreign}", "--define",
                         "dctest-bad-new"], {}, 2, "--from needs a direct-backup"),
    ("mount", ["mount", GHOST, "{target}"], {}, 2, "no workflow with id"),
    ("mount", ["mount", "xyz", "{target}"], {}, 2, "'xyz' is not a workflow id"),
    ("umount", ["umount", "{target}"], {}, 2, "no mounted backup of ours on"),
    ("umount", ["umount", GHOST], {}, 2, "no workflow with id"),
    ("policy", ["policy", "apply", "{badpolicy}"], {}, 2, "bad.toml:7: schedule.cron: not a cron expression"),
    ("policy", ["policy", "apply", "{target}/absent.toml"], {}, 2, "cannot read the policy file"),
    ("policy", ["policy", "show", "nope"], {}, 2, "no policy named 'nope'"),
    ("policy", ["policy", "delete", "nope"], {}, 2, "no policy named 'nope'"),
    ("scheduler", ["scheduler", "--interval", "nan"], {}, 2, "--interval must be a finite number"),
    ("scheduler", ["scheduler", "--interval", "-1"], {}, 2, "--interval must be at least 0.05"),
    ("worker", ["worker", "--host", ""], {}, 2, "--host must not be empty"),
    ("backups", ["backups"], {}, 2, "required: --domain"),
    ("backups", ["backups", "--domain", NL], {}, 2, "--domain must not contain control characters"),
    ("checkpoints", ["checkpoints"], {}, 2, "required: --domain"),
    ("checkpoints", ["checkpoints", "--domain", NL], {}, 2, "--domain must not contain control characters"),
    ("checkpoints", ["checkpoints", "--domain", "dctest-missing-domain"], {}, 2, "is not defined"),
    ("checkpoints", ["checkpoints", "--domain", "{dom}", "--uri",
                     "qemu+unix:///system?socket=/run/libvirt/domcapture-nonexistent"], {},
     4, "cannot connect to libvirt"),
    ("completion", ["completion"], {}, 2, "required: shell"),
    ("completion", ["completion", "tcsh"], {}, 2, "invalid choice: 'tcsh'"),
]


def _ids() -> list[str]:
    seen: Counter[str] = Counter()
    out = []
    for group, *_ in CASES:
        seen[group] += 1
        out.append(f"{group}-{seen[group]}")
    return out


@pytest.fixture(scope="module")
def world(redis_client, libvirt_uri, tmp_path_factory):
    """One domain, one empty target, and a few records, on a private prefix."""
    prefix = f"dct-bad-{TAG}"
    base = tmp_path_factory.mktemp("badinput")
    dom = DiskDomain.create(libvirt_uri, base / "dom", sizes_mib={"vda": 16})
    target = base / "target"
    target.mkdir()
    # targets a user other than root or the worker's could rename a capture folder in
    unsafe = {"shared": 0o777, "groupw": 0o770, "lent": 0o755, "lentsticky": 0o1777}
    for name, mode in unsafe.items():
        (base / name).mkdir()
        os.chmod(base / name, mode)
        if name.startswith("lent"):
            os.chown(base / name, 65534, 65534)
    (base / "shared" / "inner").mkdir(mode=0o700)
    regular = base / "regular-file"
    regular.write_text("not a folder\n")
    badpolicy = base / "bad.toml"
    badpolicy.write_text(f'name = "bad"\nstrategy = "direct-backup"\ndomains = ["{dom.name}"]\n[hosts]\n'
                         f'h = "{libvirt_uri}"\n[schedule]\ncron = "0 25 * * *"\ntimezone = "UTC"\n')
    store = Store(redis_client, prefix)
    strkey = new_id()
    redis_client.set(f"{prefix}:wf:{strkey}", "not a record")
    foreign = Record(id=new_id(), strategy="snapshot-backup", definition_version=1, domain="dctest-elsewhere",
                     uri=libvirt_uri, params={}, state="succeeded", status="succeeded")
    store.create(foreign)
    queued = Record(id=new_id(), strategy="snapshot-backup", definition_version=1, domain="dctest-queued",
                    uri=libvirt_uri, params={}, state="preflight", status="queued")
    store.create(queued)
    env = {**os.environ, "DOMCAPTURE_REDIS_URL": "redis://127.0.0.1:6379/0", "LIBVIRT_DEFAULT_URI": libvirt_uri,
           "DOMCAPTURE_PREFIX": prefix, "DOMCAPTURE_QUEUE": f"{prefix}-q", "PYTHONPATH": str(REPO)}
    for var in ("DOMCAPTURE_REDIS_PASSWORD", "DOMCAPTURE_REDIS_PASSWORD_FILE", "DOMCAPTURE_REDIS_USERNAME",
                "DOMCAPTURE_LEASE_TTL", "DOMCAPTURE_RECOVERY_INTERVAL", "RQ_KEY_PREFIX", "DOMCAPTURE_FAULT"):
        env.pop(var, None)
    values = {"dom": dom.name, "target": str(target), "file": str(regular), "strkey": strkey,
              "badpolicy": str(badpolicy),
              "foreign": foreign.id, "queued": queued.id,
              **{name: str(base / name) for name in unsafe}}
    yield {"prefix": prefix, "dom": dom, "target": target, "base": base, "env": env, "values": values,
           "redis": redis_client}
    dom.destroy()
    for key in redis_client.scan_iter(f"{prefix}:*"):
        redis_client.delete(key)


def observe(w: dict) -> dict:
    """Everything a refused command must leave as it was."""
    r, prefix, dom = w["redis"], w["prefix"], w["dom"]
    # the audit log is the one key a refused command adds to (who tried what, and that it was refused)
    keys = {k: r.dump(k) for k in r.scan_iter(f"{prefix}:*") if k != f"{prefix}:audit".encode()}
    strays = sorted(k for k in r.scan_iter("rq:*") if prefix.encode() in k)
    files = sorted((str(p.relative_to(w["base"])), p.stat().st_size) for p in w["base"].rglob("*")
                   if not p.name.endswith(".log"))
    # other people's tests define domains meanwhile: only ours and the --define names count
    names = subprocess.run(["virsh", "-c", dom.uri, "list", "--all", "--name"], capture_output=True, text=True,
                           timeout=60).stdout.split()
    script = (f"snapshot-list {dom.name} --name; checkpoint-list {dom.name} --name; domblklist {dom.name}; "
              f"domstate {dom.name}")
    ours = subprocess.run(["virsh", "-c", dom.uri, script], capture_output=True, text=True, timeout=60)
    assert ours.returncode == 0, ours.stderr
    return {"keys": keys, "strays": strays, "files": files, "ours": ours.stdout,
            "domains": sorted(n for n in names if n.startswith("dctest-bad") or n == dom.name)}


@pytest.mark.parametrize("group, argv, extra_env, code, fragment", CASES, ids=_ids())
def test_bad_input_is_refused_without_side_effects(world, group, argv, extra_env, code, fragment):
    values = world["values"]
    args = [a.format(**values) for a in argv]
    env = {**world["env"], **{k: v.format(**values) for k, v in extra_env.items()}}
    before = observe(world)
    audited = world["redis"].xlen(f"{world['prefix']}:audit")
    t0 = time.monotonic()
    out = subprocess.run([DOMCAPTURE, *args], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == code, (out.returncode, out.stderr)
    assert "Traceback" not in out.stderr
    assert out.stderr.endswith("\n") and out.stderr.count("\n") == 1, out.stderr  # exactly one line
    assert out.stderr.startswith("domcapture"), out.stderr
    assert fragment in out.stderr, out.stderr
    assert out.stdout == ""
    assert time.monotonic() - t0 < 60
    after = observe(world)
    assert after == before
    for _, entry in world["redis"].xrange(f"{world['prefix']}:audit", min="-", max="+")[audited:]:
        assert not entry[b"outcome"].startswith(b"ok"), entry  # audited, if at all, as refused


def table() -> str:
    counts = Counter(group for group, *_ in CASES)
    rows = ["| subcommand / strategy | cases |", "| --- | --- |"]
    rows += [f"| `{g}` | {n} |" for g, n in counts.items()]
    rows.append(f"| **total** | **{len(CASES)}** |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(table())
