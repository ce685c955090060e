"""Hostile policies: each refused whole at ``policy apply``, and a broken stored one never stops the others.

``test_apply_refuses_*`` runs ``domcapture policy apply`` on one hostile file
per case, in a deployment prefix where a good version 1 of the same policy is
already stored: every case through the CLI's ``main`` (one Python process runs
them all in turn, its exit status and stderr per case), and the ``REAL_BINARY``
ones also as the installed command, each in a process and prefix of its own.  Each must exit 2 with one line
``domcapture: error: FILE:LINE: FIELD: why`` (``FILE: FIELD: why`` when no line
applies), no traceback, nothing on stdout, and every Redis key of the prefix
the same, byte for byte (``DUMP``), but the audit stream, which records the
refusal.  The cases: a cron that never fires or is not five fields, strategy
options and values the strategy refuses at submit, control characters
anywhere, nesting and size past the limits.

``test_scheduler_*``: policies stored before these checks existed (or broken
since) beside a good one, on real Redis and the in-memory hypervisor: the good
one's slots are submitted, each bad one is marked errored (``policy list``,
``policy show``, ``domcapture_policy_errors``), and a fixed version clears it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterator

import pytest
import redis
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from workers.metrics import StoreCollector
from workflows.policy import MAX_BYTES, PolicyStore, parse
from workflows.store import Store

from .realenv import DOMCAPTURE
from .test_scheduler import Fleet

pytestmark = pytest.mark.real

BASE = """\
name = "nightly"
strategy = "direct-backup"
target = "/var/backups/dc"
domains = ["web-*"]
tags = ["nightly"]

[hosts]
hv1 = "qemu:///system"

[options]
mode = "pull"
quiesce = "try"

[full]
every = 6

[schedule]
cron = "0 2 * * *"
timezone = "Europe/Paris"

[retention]
keep_daily = 7

[verify]
cron = "0 6 * * 0"

[limits]
per_host = 2
"""
# the lines of BASE, for the expected positions
L_TARGET, L_DOMAINS, L_TAGS, L_HV1, L_MODE, L_QUIESCE, L_CRON, L_ZONE, L_VERIFY = 3, 4, 5, 8, 11, 12, 18, 19, 25
KEY = "{key}"  # replaced by a real, readable key file


def sub(old: str, new: str) -> Callable[[str], str]:
    def edit(text: str) -> str:
        assert text.count(old) == 1, old
        return text.replace(old, new)
    return edit


def option(line: str) -> Callable[[str], str]:
    """Add ``line`` to [options] (after quiesce)."""
    return sub('quiesce = "try"\n', f'quiesce = "try"\n{line}\n')


Case = tuple[Callable[[str], Any], str, str]  # (edit of BASE or whole bytes, "LINE: FIELD" expected, fragment)

CASES: dict[str, Case] = {
    # -- a schedule that never fires, or is not cron ------------------------------------------------
    "cron-feb-31": (sub('"0 2 * * *"', '"0 0 31 2 *"'), f"{L_CRON}: schedule.cron", "never fires"),
    "cron-feb-30": (sub('"0 2 * * *"', '"0 0 30 2 *"'), f"{L_CRON}: schedule.cron", "never fires"),
    "cron-april-31": (sub('"0 2 * * *"', '"0 3 31 4 *"'), f"{L_CRON}: schedule.cron", "never fires"),
    "cron-six-fields": (sub('"0 2 * * *"', '"* * * * * *"'), f"{L_CRON}: schedule.cron", "five fields"),
    "cron-year-field": (sub('"0 2 * * *"', '"0 2 * * * 2030"'), f"{L_CRON}: schedule.cron", "five fields"),
    "cron-reboot": (sub('"0 2 * * *"', '"@reboot"'), f"{L_CRON}: schedule.cron", "not a cron expression"),
    "cron-hashed": (sub('"0 2 * * *"', '"H 2 * * *"'), f"{L_CRON}: schedule.cron", "not a cron expression"),
    "cron-hour-25": (sub('"0 2 * * *"', '"0 25 * * *"'), f"{L_CRON}: schedule.cron", "not a cron expression"),
    "cron-empty": (sub('"0 2 * * *"', '" "'), f"{L_CRON}: schedule.cron", "non-empty"),
    "cron-not-a-string": (sub('"0 2 * * *"', "2"), f"{L_CRON}: schedule.cron", "non-empty string"),
    "verify-cron-feb-31": (sub('"0 6 * * 0"', '"0 6 31 2 *"'), f"{L_VERIFY}: verify.cron", "never fires"),
    "zone-unknown": (sub('"Europe/Paris"', '"Mars/Olympus"'), f"{L_ZONE}: schedule.timezone", "unknown time zone"),
    "zone-path": (sub('"Europe/Paris"', '"../../../etc/passwd"'), f"{L_ZONE}: schedule.timezone", "unknown"),
    # -- strategy options, as submit checks them ------------------------------------------------------
    "option-bad-choice": (sub('mode = "pull"', 'mode = "tape"'), f"{L_MODE}: options.mode",
                          "must be one of push, pull (got 'tape')"),
    "option-unknown": (sub('mode = "pull"', 'mdoe = "pull"'), f"{L_MODE}: options.mdoe",
                       "unknown option of direct-backup"),
    "option-of-another-strategy": (option('commit_timeout = 60'), f"{L_QUIESCE + 1}: options.commit_timeout",
                                   "unknown option of direct-backup"),
    "option-bool-for-choice": (sub('mode = "pull"', "mode = true"), f"{L_MODE}: options.mode", "must be one of"),
    "option-list-for-choice": (sub('mode = "pull"', 'mode = ["pull"]'), f"{L_MODE}: options.mode", "must be one of"),
    "option-quiesce": (sub('quiesce = "try"', 'quiesce = "maybe"'), f"{L_QUIESCE}: options.quiesce",
                       "must be one of off, try, require"),
    "option-on-error": (option('on_error = "ignore"'), f"{L_QUIESCE + 1}: options.on_error", "must be one of"),
    "option-negative-seconds": (option("freeze_deadline = -1"), f"{L_QUIESCE + 1}: options.freeze_deadline",
                                "must be positive"),
    "option-nan-seconds": (option("freeze_deadline = nan"), f"{L_QUIESCE + 1}: options.freeze_deadline",
                           "finite"),
    "option-inf-seconds": (option("backup_timeout = inf"), f"{L_QUIESCE + 1}: options.backup_timeout", "finite"),
    "option-zero-seconds": (option("hook_timeout = 0"), f"{L_QUIESCE + 1}: options.hook_timeout",
                            "must be positive"),
    "option-words-for-seconds": (option('backup_timeout = "soon"'), f"{L_QUIESCE + 1}: options.backup_timeout",
                                 "must be a number"),
    "option-date-value": (option("hooks_on = 1979-05-27"), f"{L_QUIESCE + 1}: options.hooks_on",
                          "must be a string, a number"),
    "option-table-value": (option("mode2 = { a = 1 }"), f"{L_QUIESCE + 1}: options.mode2", "unknown option"),
    "option-bad-disk": (option('disks = ["v da"]'), f"{L_QUIESCE + 1}: options.disks", "is not a disk target"),
    "option-disk-twice": (option('disks = ["vda", "vda"]'), f"{L_QUIESCE + 1}: options.disks", "names vda twice"),
    "option-exclude-what-disks-asks": (option('disks = ["vda"]\nexclude = ["vda"]'),
                                       f"{L_QUIESCE + 2}: options.exclude", "which --disks asks for"),
    "option-compress-with-push": (sub('mode = "pull"', 'mode = "push"\ncompress = "zstd"'),
                                  f"{L_MODE + 1}: options.compress", "--compress needs --mode pull"),
    "option-compress-and-encrypt": (option(f'compress = "zstd"\nencrypt_key_file = "{KEY}"'),
                                    f"{L_QUIESCE + 1}: options.compress", "not offered together"),
    "option-missing-key-file": (option('encrypt_key_file = "/nonexistent/domcapture.key"'),
                                f"{L_QUIESCE + 1}: options.encrypt_key_file", "no such file"),
    "option-hook-without-freeze": (sub('quiesce = "try"', 'quiesce = "off"\npre_freeze = "sync"'),
                                   f"{L_QUIESCE + 1}: options.pre_freeze", "need --quiesce try or require"),
    "option-target-inside": (option('target = "/elsewhere"'), f"{L_QUIESCE + 1}: options.target",
                             "is set by the policy itself"),
    "option-for-another-strategy": (lambda t: sub("[full]\nevery = 6\n\n", "")(
                                        sub('strategy = "direct-backup"', 'strategy = "managed-save"')(t)),
                                    f"{L_MODE}: options.mode", "unknown option of managed-save; it takes on_error"),
    "strategy-unknown": (sub('strategy = "direct-backup"', 'strategy = "tape"'), "2: strategy",
                         "unknown strategy 'tape'"),
    "target-missing": (sub('target = "/var/backups/dc"\n', ""), "1: target", "is required by direct-backup"),
    # -- control characters, wherever they are -------------------------------------------------------
    "control-in-uri-newline": (sub('"qemu:///system"', '"qemu:///system\\n"'), f"{L_HV1}: hosts.hv1",
                               "control characters"),
    "control-in-uri-escape": (sub('"qemu:///system"', '"qemu:///system\\u001b[2J"'), f"{L_HV1}: hosts.hv1",
                              "control characters"),
    "control-in-host-name": (sub('hv1 = "qemu:///system"', '"hv\\u0007" = "qemu:///system"'),
                             f"{L_HV1}: hosts.'hv\\x07'", "control characters"),
    "control-in-domain-glob": (sub('"web-*"', '"web-\\u001b[31m*"'), f"{L_DOMAINS}: domains", "control characters"),
    "control-in-tag": (sub('["nightly"]', '["night\\tly"]'), f"{L_TAGS}: tags", "control characters"),
    "control-in-target": (sub('"/var/backups/dc"', '"/var/backups/dc\\r"'), f"{L_TARGET}: target",
                          "control characters"),
    "control-in-name": (sub('name = "nightly"', 'name = "nightly\\u0000"'), "1: name", "control characters"),
    "control-in-option": (sub('quiesce = "try"', 'quiesce = "try"\npre_freeze = "sync\\nreboot"'),
                          f"{L_QUIESCE + 1}: options.pre_freeze", "control characters"),
    "control-in-cron": (sub('"0 2 * * *"', '"0 2 * * *\\u007f"'), f"{L_CRON}: schedule.cron", "control characters"),
    # -- nesting and size ----------------------------------------------------------------------------
    "deep-array-5000": (sub('mode = "pull"', "mode = " + "[" * 5000 + "]" * 5000), f"{L_MODE}: options.mode",
                        "nested too deeply"),
    "deep-inline-table-5000": (sub('tags = ["nightly"]\n', 'tags = ["nightly"]\nx = ' + "{a=" * 5000 + "1"
                                   + "}" * 5000 + "\n"), f"{L_TAGS + 1}: x", "nested too deeply"),
    "deep-array-50": (sub('mode = "pull"', "mode = " + "[" * 50 + "]" * 50), f"{L_MODE}: options.mode",
                      "nested too deeply"),
    "too-large": (lambda t: t + ("# padding\n" * (MAX_BYTES // 10 + 1)), "size", "larger than 256 KiB"),
    "not-utf8": (lambda t: t.encode() + b"# \xff\xfe\n", "not UTF-8 text", ""),
}


def dump(r: redis.Redis, prefix: str) -> dict[bytes, bytes | None]:
    """Every key of the deployment, serialized (DUMP), but the audit stream (it records the refusal)."""
    return {k: r.dump(k) for k in r.scan_iter(f"{prefix}:*") if k != f"{prefix}:audit".encode()}


#: the cases also run as the installed command, in a process of its own (the rest run through ``main``)
REAL_BINARY = ("cron-feb-31", "option-bad-choice", "option-unknown", "control-in-uri-escape", "deep-array-5000",
               "deep-inline-table-5000", "too-large", "not-utf8")


def write_case(folder: Any, case: str) -> str:
    body = CASES[case][0](BASE)
    path = folder / f"{case}.toml"
    path.write_bytes(body if isinstance(body, bytes) else body.replace(KEY, str(folder / "key")).encode())
    return str(path)


def seeded(r: redis.Redis) -> tuple[str, dict[bytes, bytes | None]]:
    """A fresh prefix holding version 1 of the policy (a stored refusal would make a version 2)."""
    prefix = f"dct-{uuid.uuid4().hex[:8]}"
    PolicyStore(r, prefix).apply(parse(BASE))
    return prefix, dump(r, prefix)


#: runs in a Python process of its own, started with the deployment's prefix (RQ takes it at import):
#: applies each file through the CLI's ``main`` and compares the store before and after each
RUNNER = """
import contextlib, io, json, os, sys
import redis
from workers import cli
r = redis.Redis.from_url(os.environ.get("DOMCAPTURE_REDIS_URL", "redis://127.0.0.1:6379/0"))
prefix = os.environ["DOMCAPTURE_PREFIX"]
def dump():
    return {k.hex(): (r.dump(k) or b"").hex() for k in r.scan_iter(prefix + ":*") if k != (prefix + ":audit").encode()}
out = {}
for path in json.load(sys.stdin):
    before = dump()
    err, std = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(std):
        code = cli.main(["policy", "apply", path])
    out[path] = {"code": code, "stdout": std.getvalue(), "stderr": err.getvalue(), "before": before, "after": dump()}
print(json.dumps(out))
"""


def in_one_process(r: redis.Redis, paths: list[str]) -> dict[str, dict[str, Any]]:
    prefix, _ = seeded(r)
    env = {**os.environ, "DOMCAPTURE_PREFIX": prefix, "DOMCAPTURE_QUEUE": f"{prefix}-q"}
    p = subprocess.run([sys.executable, "-c", RUNNER], input=json.dumps(paths), capture_output=True, text=True,
                       env=env, timeout=120)
    r.delete(*r.scan_iter(f"{prefix}:*"))
    assert p.returncode == 0, p.stderr
    done: dict[str, dict[str, Any]] = json.loads(p.stdout)
    for path, got in done.items():
        got["path"] = path
    return done


def as_command(r: redis.Redis, path: str) -> dict[str, Any]:
    prefix, before = seeded(r)
    env = {**os.environ, "DOMCAPTURE_PREFIX": prefix, "DOMCAPTURE_QUEUE": f"{prefix}-q"}
    p = subprocess.run([DOMCAPTURE, "policy", "apply", path], capture_output=True, text=True, env=env, timeout=60)
    after = dump(r, prefix)
    r.delete(*r.scan_iter(f"{prefix}:*"))
    return {"path": path, "code": p.returncode, "stdout": p.stdout, "stderr": p.stderr,
            "before": before, "after": after}


@pytest.fixture(scope="module")
def outcomes(redis_client: redis.Redis, tmp_path_factory) -> Iterator[dict[str, dict[str, Any]]]:
    folder = tmp_path_factory.mktemp("hostile-policies")
    (folder / "key").write_text("a passphrase\n")
    paths = {case: write_case(folder, case) for case in CASES}
    with ThreadPoolExecutor(8) as pool:
        real = pool.map(lambda c: as_command(redis_client, paths[c]), REAL_BINARY)
        by_path = in_one_process(redis_client, list(paths.values()))
        done = {case: by_path[path] for case, path in paths.items()}
        done.update({f"{c} (command)": got for c, got in zip(REAL_BINARY, real, strict=True)})
    yield done


def test_the_base_policy_is_accepted_as_is(redis_client, tmp_path, prefix):
    """The control: the file every case edits applies (so each refusal below is its edit's)."""
    (tmp_path / "base.toml").write_text(BASE)
    env = {**os.environ, "DOMCAPTURE_PREFIX": prefix, "DOMCAPTURE_QUEUE": f"{prefix}-q"}
    p = subprocess.run([DOMCAPTURE, "policy", "apply", str(tmp_path / "base.toml"), "--json"], capture_output=True,
                       text=True, env=env, timeout=60)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout) == {"name": "nightly", "version": 1}
    assert PolicyStore(redis_client, prefix).get("nightly").options == {"mode": "pull", "quiesce": "try"}


@pytest.mark.parametrize("case", [*CASES, *(f"{c} (command)" for c in REAL_BINARY)])
def test_apply_refuses_a_hostile_policy_whole(outcomes, case):
    got = outcomes[case]
    _, where, fragment = CASES[case.removesuffix(" (command)")]
    lines = got["stderr"].splitlines()
    assert got["code"] == 2, (got["code"], got["stderr"])
    assert got["stdout"] == "" and len(lines) == 1 and "Traceback" not in got["stderr"], got["stderr"]
    sep = ":" if where[0].isdigit() else ": "
    assert lines[0].startswith(f"domcapture: error: {got['path']}{sep}{where}"), lines[0]
    assert fragment in lines[0], lines[0]
    assert lines[0].isprintable(), lines[0]  # a control character in the file is shown escaped
    assert got["after"] == got["before"], "policy apply changed the store"


# -- the scheduler: a policy it cannot evaluate is marked, the others go on ------------------------------
def _store_raw(store: Store, name: str, doc: dict[str, Any] | str) -> None:
    """A policy as a build without today's checks stored it (PolicyStore's layout, written directly)."""
    data = doc if isinstance(doc, str) else json.dumps(doc)
    store.r.hset(f"{store.prefix}:policy:{name}", mapping={"version": 1, "data": data})
    store.r.sadd(f"{store.prefix}:policies", name)


def _scrape(store: Store) -> dict[str, float]:
    registry = CollectorRegistry()
    registry.register(StoreCollector(store, f"{store.prefix}-q"))
    text = generate_latest(registry).decode()
    return {s.labels["policy"]: s.value for fam in text_string_to_metric_families(text)
            if fam.name == "domcapture_policy_errors" for s in fam.samples}


def test_scheduler_goes_on_with_the_good_policy_beside_broken_ones(tmp_path, store: Store):
    f = Fleet(tmp_path, store)  # "nightly": 02:00 Paris, web-* and the tag nightly on one host
    good = f.policy.to_dict()
    _store_raw(store, "feb31", {**good, "name": "feb31", "cron": "0 0 31 2 *"})
    _store_raw(store, "badoption", {**good, "name": "badoption", "options": {"mode": "tape"}})
    _store_raw(store, "unreadable", "{not json")
    _store_raw(store, "future", {**good, "name": "future", "schema_version": 99})
    _store_raw(store, "escape", {**good, "name": "escape", "domains": ["web-\x1b[2J*"]})
    s = f.scheduler("a")
    s.tick()  # first sight: the good schedule starts now
    f.now += 15 * 3600  # 03:00 the next night
    out = s.tick()
    f.run_queue()
    submitted = sorted(o.slot.domain for o in out if o.slot.policy == "nightly" and o.what.startswith("submitted"))
    assert submitted == ["db1", "web-1", "web-2"]
    assert sorted(r.domain for r in store.records()) == ["db1", "web-1", "web-2"]
    errors = f.policies.errors()
    assert sorted(errors) == ["badoption", "escape", "feb31", "future", "unreadable"]
    assert "domains: must not contain control characters" in errors["escape"]["error"]
    assert "schedule.cron: '0 0 31 2 *' never fires" in errors["feb31"]["error"]
    assert "options.mode: must be one of push, pull (got 'tape')" in errors["badoption"]["error"]
    assert "schema version 99" in errors["future"]["error"]
    assert errors["unreadable"]["error"].startswith("JSONDecodeError")
    assert sorted(o.slot.policy for o in out if o.what.startswith("error:")) == sorted(errors)
    assert _scrape(store) == {"badoption": 1.0, "escape": 1.0, "feb31": 1.0, "future": 1.0, "unreadable": 1.0}

    # what an operator sees: the real commands, on this deployment
    env = {**os.environ, "DOMCAPTURE_PREFIX": store.prefix, "DOMCAPTURE_QUEUE": f"{store.prefix}-q"}
    listed = subprocess.run([DOMCAPTURE, "policy", "list", "--json"], capture_output=True, text=True, env=env,
                            timeout=60)
    assert listed.returncode == 0, listed.stderr
    rows = {r["name"]: r for r in json.loads(listed.stdout)}
    assert "error" not in rows["nightly"] and rows["nightly"]["version"] == 1
    assert {n for n, r in rows.items() if "error" in r} == set(errors)
    text = subprocess.run([DOMCAPTURE, "policy", "list"], capture_output=True, text=True, env=env, timeout=60)
    assert text.returncode == 0 and text.stdout.count("ERRORED, skipped by the scheduler") == 5, text.stdout
    shown = subprocess.run([DOMCAPTURE, "policy", "show", "escape"], capture_output=True, text=True, env=env,
                           timeout=60)
    assert shown.returncode == 0, shown.stderr
    assert "web-\\x1b[2J*" in shown.stdout and "ERRORED:" in shown.stdout
    assert all(line.isprintable() for line in (text.stdout + shown.stdout).splitlines())  # escaped, never raw

    # the next night: the good one again, the broken ones still skipped
    f.now += 86400
    again = s.tick()
    assert len([o for o in again if o.slot.policy == "nightly" and o.what.startswith("submitted")]) == 3
    assert len(list(store.records())) == 6
    f.run_queue()

    # a fixed version clears its mark, and its slots are submitted from then on
    fixed = parse(f"""name = "feb31"\nstrategy = "direct-backup"\ntarget = "{tmp_path / 'bk'}"
domains = ["scratch"]\n[hosts]\nhv1 = "{f.uri}"\n[schedule]\ncron = "0 2 * * *"\ntimezone = "Europe/Paris"\n""",
                  check_uri=None)
    f.policies.apply(fixed)
    s.tick()  # its cursor starts now
    f.now += 86400
    later = s.tick()
    assert [o.slot.domain for o in later if o.slot.policy == "feb31" and o.what.startswith("submitted")] == \
        ["scratch"]
    assert sorted(f.policies.errors()) == ["badoption", "escape", "future", "unreadable"]
    assert _scrape(store) == {"badoption": 1.0, "escape": 1.0, "future": 1.0, "unreadable": 1.0}


def test_scheduler_marks_a_policy_broken_after_its_apply(tmp_path, store: Store):
    """A stored policy whose key file is removed later: marked errored at the next pass, not failed per slot."""
    f = Fleet(tmp_path, store)
    key = tmp_path / "backup.key"
    key.write_text("a passphrase\n")
    text = (f'name = "sealed"\nstrategy = "direct-backup"\ntarget = "{tmp_path / "bk"}"\ndomains = ["web-2"]\n'
            f'[hosts]\nhv1 = "{f.uri}"\n[options]\nmode = "pull"\nencrypt_key_file = "{key}"\n'
            '[schedule]\ncron = "0 2 * * *"\ntimezone = "Europe/Paris"\n')
    from workflows import strategies
    f.policies.apply(parse(text, check_uri=None, definitions=strategies.DEFINITIONS))
    s = f.scheduler("a")
    s.tick()
    key.unlink()
    f.now += 15 * 3600
    out = s.tick()
    assert sorted(o.slot.domain for o in out if o.what.startswith("submitted")) == ["db1", "web-1", "web-2"]
    assert {o.slot.policy for o in out if o.what.startswith("submitted")} == {"nightly"}
    assert "options.encrypt_key_file" in f.policies.errors()["sealed"]["error"]
    assert store.slots("sealed") == []  # no slot was refused one by one: the policy is skipped whole
