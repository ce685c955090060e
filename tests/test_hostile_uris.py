"""Hosts are configured, not typed: hostile libvirt URIs against every surface that takes one.

A libvirt URI is an address libvirt acts on: ``qemu+ext:///system?command=PATH``
runs PATH as the caller (root, for a worker or the console).  The trap here is a
real script that touches a marker file; ``test_control_*`` shows that libvirt,
handed each ``RUNS`` URI directly, does run it.  Every other case hands the same
URIs (and more: escapes, separators, ssh option injection, paths outside the
documented folders, control characters, overlong) to a surface and asserts:
refused (exit 2 and one line, or a 4xx), the marker never created, the sentinel
file's sha256 unchanged, no process of the trap in the process table, and every
Redis key of the deployment the same, byte for byte (``DUMP``).

Groups: ``test_allowlist_*`` (the parser, typed values), ``test_cli_*`` (the
real ``domcapture`` command: ``submit --uri``, ``checkpoints --uri``,
LIBVIRT_DEFAULT_URI, ``host add``, ``policy apply``), ``test_console_*`` (a
real ``domcapture web``: anonymous, read-only and normal users; a typed URI, a
hostile host name, a forged registry entry), ``test_registry_*`` (host add,
list, remove, and policies registering their hosts).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest
import redis

from workflows import validate
from workflows.errors import InputError
from workflows.hosts import HostRegistry
from workflows.policy import PolicyError, parse
from workflows.record import Record
from workflows.store import Store

from .realenv import DOMCAPTURE
from .test_web_http import csrf_of, login
from .webenv import WebServer

pytestmark = pytest.mark.real

TRAP = Path(tempfile.gettempdir()) / f"dctest-hostile-{uuid.uuid4().hex[:8]}"
SCRIPT, MARKER, SENTINEL = TRAP / "trap.sh", TRAP / "marker", TRAP / "sentinel.xml"
S, D = str(SCRIPT), str(TRAP)

#: URIs libvirt runs the trap for when handed them directly (test_control_* proves each)
RUNS = {
    "ext": f"qemu+ext:///system?command={S}",
    "ext-upper": f"QEMU+EXT:///system?command={S}",
    "ext-mixed-case": f"Qemu+Ext:///system?command={S}",
    "ext-no-path": f"qemu+ext://?command={S}",
    "ext-localhost": f"qemu+ext://localhost/system?command={S}",
    "ext-session": f"qemu+ext:///session?command={S}",
    "ext-remote-driver": f"remote+ext:///system?command={S}",
    "ext-lxc": f"lxc+ext:///?command={S}",
    "ext-fragment": f"qemu+ext:///system?command={S}#frag",
    "ext-after-param": f"qemu+ext:///system?no_verify=1&command={S}",
    "ext-escaped-value": "qemu+ext:///system?command=" + S.replace("/", "%2F"),
    "ext-escaped-name": f"qemu+ext:///system?%63ommand={S}",
    "ext-semicolon": f"qemu+ext:///system?mode=auto;command={S}",
}
#: more shapes the allowlist refuses (some harmless to this libvirt, all outside the documented set)
OTHERS = {
    "ext-escaped-scheme": f"qemu+%65xt:///system?command={S}",
    "ext-bare": "qemu+ext://",
    "command-without-ext": f"qemu:///system?command={S}",
    "ssh-option-injection": f"qemu+ssh://-oProxyCommand={S}/system",
    "ssh-user-injection": f"qemu+ssh://-oProxyCommand={S}@h/system",
    "netcat-param": f"qemu+ssh://h/system?netcat={S}",
    "name-param": f"qemu://h/system?name=qemu+ext:///system?command={S}",
    "socket-outside": f"qemu+unix:///system?socket={D}/sock",
    "socket-dotdot": f"qemu+unix:///system?socket=/run/libvirt/../..{D}/sock",
    "socket-twice": f"qemu+unix:///system?socket=/run/libvirt/libvirt-sock&socket={D}/sock",
    "keyfile-outside": f"qemu+ssh://h/system?keyfile={SENTINEL}",
    "known-hosts-outside": f"qemu+ssh://h/system?known_hosts={SENTINEL}",
    "pkipath-outside": f"qemu+tls://h/system?pkipath={D}",
    "test-driver-file": f"test://{SENTINEL}",
    "test-driver-default": "test:///default",
    "newline": "qemu:///system\nqemu+ext:///system",
    "tab": "qemu:///system\t",
    "escape": "qemu:///system\x1b[2J",
    "space-before": f" qemu+ext:///system?command={S}",
    "fullwidth-plus": f"qemu\uff0bext:///system?command={S}",
    "overlong": "qemu:///system?mode=auto&" + "no_tty=1&" * 600,
    "other-path": "qemu:///embed?root=/tmp",
    "libssh2": f"qemu+libssh2://h/system?known_hosts={SENTINEL}",
}
HOSTILE = {**RUNS, **OTHERS}
SOME = ["ext", "ext-upper", "ext-escaped-name", "ext-semicolon", "ssh-option-injection", "socket-outside",
        "keyfile-outside", "test-driver-file", "newline", "overlong"]
FEW = ["ext", "ext-mixed-case", "ext-semicolon", "socket-dotdot", "escape"]
GOOD = ["qemu:///system", "qemu:///session", "qemu+unix:///system?socket=/run/libvirt/virtqemud-sock",
        "qemu+ssh://root@hv1.example.org/system?keyfile=/root/.ssh/id_ed25519&known_hosts=/etc/domcapture/kh",
        "qemu+ssh://backup@10.0.0.7:2222/system?no_verify=1&proxy=native", "qemu+tls://hv2/system?pkipath=/etc/pki/libvirt",
        "qemu+tcp://[fd00::1]:16509/system", "qemu+ssh://hv3/session?mode=direct&no_tty=1"]


SENTINEL_TEXT = "<node><domain type='test'><name>dctest-sentinel</name></domain></node>\n"
SENTINEL_SHA = hashlib.sha256(SENTINEL_TEXT.encode()).hexdigest()


# -- the trap and what "nothing happened" means -------------------------------------------------
@pytest.fixture(scope="module", autouse=True)
def trap() -> Iterator[None]:
    TRAP.mkdir(mode=0o755)
    SCRIPT.write_text(f"#!/bin/sh\ntouch {MARKER}\n")
    SCRIPT.chmod(0o755)
    SENTINEL.write_text(SENTINEL_TEXT)
    yield
    shutil.rmtree(TRAP, ignore_errors=True)


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def trap_processes() -> list[str]:
    out = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if str(TRAP).encode() in cmd:
                out.append(f"{pid}: {cmd!r}")
    return out


def redis_state(r: redis.Redis, prefix: str) -> dict[bytes, bytes | None]:
    """Every key of the deployment, byte for byte; a console's sessions and audit log left out."""
    keys = [k for k in r.scan_iter(f"{prefix}:*", count=1000) if b":web:" not in k and not k.endswith(b":audit")]
    return {k: r.dump(k) for k in sorted(keys)}


class Untouched:
    """The outside world before a case: compared after it, as a whole."""

    def __init__(self, r: redis.Redis, prefix: str) -> None:
        self.r, self.prefix = r, prefix
        self.sentinel = sha(SENTINEL)
        self.script = sha(SCRIPT)
        self.state = redis_state(r, prefix)
        assert not MARKER.exists()

    def check(self) -> None:
        assert not MARKER.exists(), "the trap ran: libvirt was handed the URI"
        assert sha(SENTINEL) == self.sentinel and sha(SCRIPT) == self.script
        assert sorted(os.listdir(TRAP)) == ["sentinel.xml", "trap.sh"]
        assert trap_processes() == []
        assert redis_state(self.r, self.prefix) == self.state


def seed(r: redis.Redis, prefix: str) -> None:
    """Something to keep: a registered host and a workflow record."""
    r.hset(f"{prefix}:host-uris", "hv0", "qemu:///system")
    r.hset(f"{prefix}:hosts", "qemu:///system", "hv0")
    Store(r, prefix).create(Record(id=uuid.uuid4().hex[:16], strategy="snapshot-backup", definition_version=1,
                                   domain="dctest-hostile", uri="qemu:///system", params={}, state="copying",
                                   status="failed"))


@pytest.fixture
def world(redis_client: redis.Redis, prefix: str) -> Untouched:
    seed(redis_client, prefix)
    return Untouched(redis_client, prefix)


def env_for(prefix: str, **extra: str) -> dict[str, str]:
    return {**os.environ, "DOMCAPTURE_PREFIX": prefix, "DOMCAPTURE_QUEUE": f"{prefix}-q",
            "LIBVIRT_DEFAULT_URI": "qemu:///system", **extra}


def refused(cmd: list[str], env: dict[str, str]) -> str:
    """Run the real command; it must exit 2 with one line on stderr and nothing on stdout."""
    p = subprocess.run([DOMCAPTURE, *cmd], capture_output=True, text=True, env=env, timeout=60)
    lines = p.stderr.splitlines()
    assert p.returncode == 2, (p.returncode, p.stderr)
    assert p.stdout == "" and len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    assert lines[0].startswith("domcapture: error: ")
    return lines[0]


# -- the control: libvirt really runs these -------------------------------------------------------
@pytest.mark.parametrize("case", sorted(RUNS))
def test_control_libvirt_runs_the_trap_when_handed_the_uri(case):
    """Without domcapture in between, each RUNS URI makes libvirt run the trap: the cases below can fail."""
    import libvirt
    libvirt.registerErrorHandler(lambda *_: None, None)
    try:
        libvirt.open(RUNS[case]).close()
    except libvirt.libvirtError:
        pass
    try:
        assert MARKER.exists(), f"libvirt did not run {RUNS[case]!r}"
    finally:
        MARKER.unlink(missing_ok=True)


# -- the allowlist, as a library caller passes values -----------------------------------------------
@pytest.mark.parametrize("case", sorted(HOSTILE) + ["nul"])
def test_allowlist_refuses_in_one_line(case):
    uri = HOSTILE.get(case, "qemu:///system\x00")
    with pytest.raises(InputError) as err:
        validate.libvirt_uri("uri", uri)
    msg = str(err.value)
    assert msg.startswith("--uri ") and "\n" not in msg and len(msg) < 400
    assert not MARKER.exists()


@pytest.mark.parametrize("uri", GOOD)
def test_allowlist_accepts_the_documented_shapes(uri):
    assert validate.libvirt_uri("uri", uri) == uri


@pytest.mark.parametrize("value", [None, 3, b"qemu:///system", ["qemu:///system"], ""])
def test_allowlist_refuses_non_strings_and_empty(value):
    with pytest.raises(InputError):
        validate.libvirt_uri("uri", value)


# -- the command line -----------------------------------------------------------------------------
# Each case is one real `domcapture` process on a deployment prefix of its own (seeded, then compared
# key by key).  They run a few at a time in one module fixture, so ~140 processes stay within the
# file's time budget on a loaded machine; each test then asserts its own case's outcome, and the
# trap's marker, sentinel and process table after all of them.
def policy_text(uri: str, target: str) -> str:
    return (f'name = "hostile"\nstrategy = "snapshot-backup"\ntarget = {json.dumps(target)}\n'
            f'domains = ["dctest-hostile"]\n[hosts]\nhv9 = {json.dumps(uri)}\n'
            '[schedule]\ncron = "0 2 * * *"\ntimezone = "UTC"\n')


REGISTRY_BAD = {
    "conflict": (["host", "add", "hv0", "qemu:///session"], "is registered as 'qemu:///system'"),
    "add-default": (["host", "add", "default", "qemu:///session"], "the deployment's own URI"),
    "space-in-name": (["host", "add", "bad name", "qemu:///system"], "NAME 'bad name' must be letters"),
    "dash-name": (["host", "add", "--", "-x", "qemu:///system"], "NAME '-x' must be letters"),
    "long-name": (["host", "add", "a" * 65, "qemu:///system"], "at most 64"),
    "dotdot-name": (["host", "add", "../hv", "qemu:///system"], "must be letters"),
    "newline-name": (["host", "add", "hv\n1", "qemu:///system"], "control characters"),
    "remove-unknown": (["host", "remove", "nosuch"], "unknown host 'nosuch'"),
    "remove-default": (["host", "remove", "default"], "cannot be removed"),
    "colon-name": (["host", "remove", "hv0:evil"], "must be letters"),
}


def cli_cases(work: Path) -> dict[tuple[str, str], tuple[list[str], dict[str, str], str]]:
    """(group, case) -> (argv, extra environment, what the error line must name)."""
    out: dict[tuple[str, str], tuple[list[str], dict[str, str], str]] = {}
    submit = ["submit", "snapshot-backup", "--domain", "dctest-hostile", "--target", str(work)]
    for case, uri in HOSTILE.items():
        out[("submit", case)] = ([*submit, "--uri", uri], {}, "--uri")
    for case in SOME:
        out[("host-add", case)] = (["host", "add", "evil", HOSTILE[case]], {}, "URI")
        f = work / f"policy-{case}.toml"
        f.write_text(policy_text(HOSTILE[case], str(work)))
        out[("policy", case)] = (["policy", "apply", str(f)], {}, "hosts.hv9")
    for case in FEW:
        out[("checkpoints", case)] = (["checkpoints", "--domain", "dctest-hostile", "--uri", HOSTILE[case]], {},
                                      "--uri")
        out[("env", case)] = (submit, {"LIBVIRT_DEFAULT_URI": HOSTILE[case]}, "LIBVIRT_DEFAULT_URI")
    for case, (argv, message) in REGISTRY_BAD.items():
        out[("registry", case)] = (argv, {}, message)
    return out


class CliRun:
    def __init__(self, prefix: str, returncode: int, stdout: str, stderr: str, want: str,
                 before: dict[bytes, bytes | None], after: dict[bytes, bytes | None]) -> None:
        self.prefix, self.returncode, self.stdout, self.stderr, self.want = prefix, returncode, stdout, stderr, want
        self.before, self.after = before, after


@pytest.fixture(scope="module")
def cli_runs(redis_client: redis.Redis, tmp_path_factory) -> Iterator[dict[tuple[str, str], CliRun]]:
    work = tmp_path_factory.mktemp("hostile-cli")
    cases = cli_cases(work)
    prefixes = {key: f"dct-{uuid.uuid4().hex[:8]}" for key in cases}

    def one(key: tuple[str, str]) -> CliRun:
        argv, extra, want = cases[key]
        prefix = prefixes[key]
        seed(redis_client, prefix)
        before = redis_state(redis_client, prefix)
        p = subprocess.run([DOMCAPTURE, *argv], capture_output=True, text=True, env=env_for(prefix, **extra),
                           timeout=120)
        return CliRun(prefix, p.returncode, p.stdout, p.stderr, want, before, {})

    try:
        with ThreadPoolExecutor(max_workers=6) as pool:
            runs = dict(zip(cases, pool.map(one, cases), strict=True))
        for run in runs.values():
            run.after = redis_state(redis_client, run.prefix)
        yield runs
    finally:
        for prefix in prefixes.values():
            keys = list(redis_client.scan_iter(f"{prefix}:*", count=1000))
            if keys:
                redis_client.delete(*keys)


def check_cli(run: CliRun) -> None:
    lines = run.stderr.splitlines()
    assert run.returncode == 2, (run.returncode, run.stderr)
    assert run.stdout == "" and len(lines) == 1 and "Traceback" not in run.stderr, run.stderr
    assert lines[0].startswith("domcapture") and "error: " in lines[0] and run.want in lines[0], lines[0]
    assert run.after == run.before, "the refused command changed Redis"
    assert not MARKER.exists(), "the trap ran"
    assert sorted(os.listdir(TRAP)) == ["sentinel.xml", "trap.sh"] and sha(SENTINEL) == SENTINEL_SHA
    assert trap_processes() == []


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_cli_submit_uri_refused(case, cli_runs):
    check_cli(cli_runs[("submit", case)])


@pytest.mark.parametrize("case", FEW)
def test_cli_checkpoints_uri_refused(case, cli_runs):
    check_cli(cli_runs[("checkpoints", case)])


@pytest.mark.parametrize("case", FEW)
def test_cli_libvirt_default_uri_env_refused(case, cli_runs):
    check_cli(cli_runs[("env", case)])


@pytest.mark.parametrize("case", SOME)
def test_cli_policy_apply_refused(case, cli_runs):
    check_cli(cli_runs[("policy", case)])


@pytest.mark.parametrize("case", SOME)
def test_registry_host_add_refused(case, cli_runs):
    check_cli(cli_runs[("host-add", case)])


# the same two surfaces as a library caller (and the scheduler) reach them, for every hostile URI
@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_registry_library_add_refused(case, world, redis_client, prefix):
    with pytest.raises(InputError) as err:
        HostRegistry(redis_client, prefix, "qemu:///system").add({"hv1": "qemu:///system", "evil": HOSTILE[case]})
    assert str(err.value).startswith("host evil: URI ") and "\n" not in str(err.value)
    world.check()  # hv1, checked before evil, was not written either


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_policy_parse_refused(case, tmp_path):
    with pytest.raises(PolicyError) as err:
        parse(policy_text(HOSTILE[case], str(tmp_path)), "p.toml")
    assert str(err.value).startswith("p.toml:6: hosts.hv9: ") and "\n" not in str(err.value)
    assert not MARKER.exists() and sha(SENTINEL) == SENTINEL_SHA


@pytest.mark.parametrize("case", sorted(REGISTRY_BAD))
def test_registry_bad_input_refused(case, cli_runs):
    check_cli(cli_runs[("registry", case)])


# -- the host registry ----------------------------------------------------------------------------
def cli(prefix: str, *args: str) -> Any:
    p = subprocess.run([DOMCAPTURE, *args, "--json"], capture_output=True, text=True, env=env_for(prefix),
                       timeout=60)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def test_registry_add_list_remove(redis_client, prefix):
    assert cli(prefix, "host", "add", "hv1", "qemu+ssh://root@hv1.example.org/system") == {
        "name": "hv1", "uri": "qemu+ssh://root@hv1.example.org/system"}
    assert cli(prefix, "host", "list") == [{"name": "default", "uri": "qemu:///system"},
                                           {"name": "hv1", "uri": "qemu+ssh://root@hv1.example.org/system"}]
    # its URI now routes to hv1's queue, as a policy's [hosts] does
    assert redis_client.hget(f"{prefix}:hosts", "qemu+ssh://root@hv1.example.org/system") == b"hv1"
    assert cli(prefix, "host", "remove", "hv1")["removed"] is True
    assert cli(prefix, "host", "list") == [{"name": "default", "uri": "qemu:///system"}]
    assert redis_client.hget(f"{prefix}:hosts", "qemu+ssh://root@hv1.example.org/system") is None


def test_registry_policy_apply_registers_its_hosts_and_refuses_a_conflict(redis_client, prefix, tmp_path):
    seed(redis_client, prefix)
    f = tmp_path / "p.toml"
    f.write_text(policy_text("qemu+ssh://hv9.example.org/system", str(tmp_path)))
    assert cli(prefix, "policy", "apply", str(f))["version"] == 1
    assert {"name": "hv9", "uri": "qemu+ssh://hv9.example.org/system"} in cli(prefix, "host", "list")
    f.write_text(policy_text("qemu+tls://elsewhere.example.org/system", str(tmp_path)))
    before = Untouched(redis_client, prefix)
    assert "host 'hv9' is registered as" in refused(["policy", "apply", str(f)], env_for(prefix))
    before.check()


# -- the console ----------------------------------------------------------------------------------
class Console:
    def __init__(self, web: WebServer, prefix: str) -> None:
        self.web, self.prefix = web, prefix

    def client(self, who: str) -> httpx.Client:
        c = httpx.Client(base_url=self.web.url, timeout=30)
        if who != "anonymous":
            assert login(c, secret=self.web.token).status_code == 303
        return c


@pytest.fixture(scope="module")
def consoles(redis_client: redis.Redis, tmp_path_factory) -> Iterator[dict[str, Console]]:
    prefix = f"dct-{uuid.uuid4().hex[:8]}"
    seed(redis_client, prefix)
    logs = tmp_path_factory.mktemp("hostile-web")
    servers = {"user": WebServer(env_for(prefix), logs / "rw"),
               "read-only": WebServer(env_for(prefix), logs / "ro", "--read-only")}
    try:
        yield {"anonymous": Console(servers["user"], prefix), "read-only": Console(servers["read-only"], prefix),
               "user": Console(servers["user"], prefix)}
    finally:
        for s in servers.values():
            s.stop()
        keys = list(redis_client.scan_iter(f"{prefix}:*", count=5000))
        if keys:
            redis_client.delete(*keys)


@pytest.fixture(scope="module")
def clients(consoles: dict[str, Console]) -> Iterator[dict[str, httpx.Client]]:
    made = {who: c.client(who) for who, c in consoles.items()}
    yield made
    for c in made.values():
        c.close()


WHO = ["anonymous", "read-only", "user"]


def console_world(consoles: dict[str, Console], redis_client: redis.Redis) -> Untouched:
    return Untouched(redis_client, consoles["user"].prefix)


@pytest.mark.parametrize("who", WHO)
@pytest.mark.parametrize("case", sorted(HOSTILE) + ["nul"])
def test_console_domain_page_refuses_a_typed_uri(case, who, consoles, clients, redis_client):
    before = console_world(consoles, redis_client)
    uri = HOSTILE.get(case, "qemu:///system\x00")
    r = clients[who].get("/domain", params={"uri": uri, "name": "dctest-hostile"})
    if who == "anonymous":
        assert r.status_code == 303 and r.headers["location"].startswith("/login")
    else:
        assert r.status_code == 400 and "never a URI" in r.text
    before.check()


@pytest.mark.parametrize("who", WHO)
@pytest.mark.parametrize("case", SOME)
def test_console_submit_refuses_a_typed_uri(case, who, consoles, clients, redis_client):
    before = console_world(consoles, redis_client)
    c = clients[who]
    token = csrf_of(c, "/login")
    r = c.post("/submit", data={"csrf": token, "strategy": "snapshot-backup", "domain": "dctest-hostile",
                                "target": "/tmp", "uri": HOSTILE[case]})
    if who == "user":
        assert r.status_code == 400 and "never a URI" in r.text
    else:  # not logged in, or a read-only console: refused before the form is read
        assert r.status_code in (401, 403)
    before.check()


@pytest.mark.parametrize("who", ["read-only", "user"])
@pytest.mark.parametrize("host, status, message", [
    ("nosuch", 404, "unknown host"),
    ("qemu+ext:///system?command=" + S, 400, "must be letters"),
    ("../../etc", 400, "must be letters"),
    ("hv0\n", 400, "control characters"),
    ("-hv0", 400, "must be letters"),
    ("h" * 65, 400, "at most 64"),
], ids=["unknown", "ext-uri", "dotdot", "newline", "dash", "too-long"])  # stable ids: the same in every xdist process
def test_console_domain_page_refuses_a_bad_host_name(host, status, message, who, consoles, clients, redis_client):
    before = console_world(consoles, redis_client)
    r = clients[who].get("/domain", params={"host": host, "name": "dctest-hostile"})
    assert r.status_code == status and message in r.text
    before.check()


@pytest.mark.parametrize("host", ["nosuch", "qemu+ext:///system?command=" + S, "hv0;x"],
                         ids=["unknown", "ext-uri", "semicolon"])
def test_console_submit_refuses_a_bad_host_name(host, consoles, clients, redis_client):
    before = console_world(consoles, redis_client)
    c = clients["user"]
    r = c.post("/submit", data={"csrf": csrf_of(c, "/login"), "strategy": "snapshot-backup",
                                "domain": "dctest-hostile", "target": "/tmp", "host": host})
    assert r.status_code == 400 and ("unknown host" in r.text or "must be letters" in r.text)
    before.check()


@pytest.mark.parametrize("case", SOME)
def test_console_forged_registry_entry_is_checked_again_before_use(case, consoles, clients, redis_client):
    """Someone wrote a hostile URI into the registry behind the CLI's back: the console refuses to open it."""
    prefix = consoles["user"].prefix
    redis_client.hset(f"{prefix}:host-uris", "forged", HOSTILE[case])
    try:
        before = console_world(consoles, redis_client)
        c = clients["user"]
        r = c.get("/domain", params={"host": "forged", "name": "dctest-hostile"})
        assert r.status_code == 400
        assert "URI " in r.text
        r = c.post("/submit", data={"csrf": csrf_of(c, "/login"), "strategy": "snapshot-backup",
                                    "domain": "dctest-hostile", "target": "/tmp", "host": "forged"})
        assert r.status_code == 400
        before.check()
    finally:
        redis_client.hdel(f"{prefix}:host-uris", "forged")


def test_console_names_hosts_not_uris(consoles, clients):
    c = clients["user"]
    page = c.get("/submit", params={"strategy": "snapshot-backup"}).text
    assert '<select name="host">' in page and re.search(r"<option[^>]*>default</option>", page)
    assert "hv0" in page and 'name="uri"' not in page
    r = c.get("/domain", params={"host": "hv0", "name": "dctest-hostile"})
    assert r.status_code == 200 and "host hv0" in r.text
    r = c.get("/domain", params={"name": "dctest-hostile"})  # no host: the deployment's default
    assert r.status_code == 200 and "host default" in r.text
    listing = c.get("/").text
    assert "/domain?host=" in listing and "/domain?uri=" not in listing
