"""The web console over plain HTTP (real ``domcapture web`` processes, real Redis):
user-file logins, read-only mode, the metrics endpoint's own access rule, and
bad command-line input (one line on stderr, exit 2, nothing started).
"""

from __future__ import annotations

import re
import subprocess

import httpx
import pytest

from workflows.record import Record, new_id

from .realenv import DOMCAPTURE
from .webenv import WebServer

pytestmark = pytest.mark.real


def env_for(prefix: str) -> dict[str, str]:
    import os
    return {**os.environ, "DOMCAPTURE_PREFIX": prefix, "DOMCAPTURE_QUEUE": f"{prefix}-q"}


def csrf_of(client: httpx.Client, path: str) -> str:
    m = re.search(r'name="csrf" value="([^"]+)"', client.get(path).text)
    assert m, path
    return m.group(1)


def login(client: httpx.Client, **form: str) -> httpx.Response:
    return client.post("/login", data={"csrf": csrf_of(client, "/login"), "next": "/", **form})


@pytest.fixture
def failed_record(store) -> Record:
    rec = Record(id=new_id(), strategy="snapshot-backup", definition_version=1,
                 domain="dctest-web-none", uri="qemu:///system", params={}, state="copying", status="failed",
                 error={"type": "StepFailed", "message": "disk full", "retryable": False, "state": "copying"})
    store.create(rec)
    return rec


def test_user_file_login_and_read_only_mode(prefix, store, failed_record, tmp_path):
    users = tmp_path / "users"
    add = subprocess.run([DOMCAPTURE, "web", "--users", str(users), "--add-user", "alice"], input="correct horse\n",
                         capture_output=True, text=True, env=env_for(prefix), timeout=30)
    assert add.returncode == 0, add.stderr
    line = users.read_text().strip()
    assert line.startswith("alice:scrypt$") and "correct horse" not in line
    assert oct(users.stat().st_mode & 0o777) == "0o600"

    web = WebServer(env_for(prefix), tmp_path / "ro", "--users", str(users), "--read-only")
    try:
        with httpx.Client(base_url=web.url) as c:
            r = login(c, username="alice", secret="wrong password")
            assert r.status_code == 401 and "login failed" in r.text
            r = login(c, username="mallory", secret="correct horse")
            assert r.status_code == 401
            assert c.get("/").status_code == 303  # still not logged in
            r = login(c, username="alice", secret="correct horse")
            assert r.status_code == 303 and r.headers["location"] == "/"
            page = c.get(f"/wf/{failed_record.id}")
            assert page.status_code == 200 and "disk full" in page.text
            assert page.headers["x-frame-options"] == "DENY" and page.headers["cache-control"] == "no-store"
            assert "action-resume" not in page.text and "read-only" in page.text
            # even with a valid CSRF token, read-only refuses the action and changes nothing
            r = c.post(f"/wf/{failed_record.id}/action/resume", data={"csrf": csrf_of(c, f"/wf/{failed_record.id}")})
            assert r.status_code == 403 and "read-only" in r.text
            assert store.load(failed_record.id).status == "failed"
            assert [e["event"] for e in store.history(failed_record.id)] == ["submitted"]
            # the list filters
            assert failed_record.id in c.get("/", params={"status": "failed", "strategy": "snapshot-backup"}).text
            assert failed_record.id not in c.get("/", params={"status": "running"}).text
            assert failed_record.id not in c.get("/", params={"host": "otherhost"}).text
            assert c.get("/", params={"status": "bogus"}).status_code == 400
            assert c.get("/wf/nosuchworkflow").status_code == 404
    finally:
        web.stop()


def test_action_refused_by_state_shows_the_library_message(prefix, store, failed_record, tmp_path):
    web = WebServer(env_for(prefix), tmp_path / "rw")
    try:
        with httpx.Client(base_url=web.url) as c:
            assert login(c, secret=web.token).status_code == 303
            token = csrf_of(c, f"/wf/{failed_record.id}")
            # verify is only for a succeeded capture: the CLI's rule and message, on the page
            r = c.post(f"/wf/{failed_record.id}/action/verify", data={"csrf": token}, follow_redirects=True)
            assert r.status_code == 200
            assert f"error: workflow {failed_record.id} is failed; only a succeeded capture can be verified" in r.text
            # a held lease: rollback is refused and the message names abort, as in the CLI
            lease = store.acquire_lease(failed_record.id, "someone-else", 30)
            assert lease is not None
            r = c.post(f"/wf/{failed_record.id}/action/rollback", data={"csrf": token}, follow_redirects=True)
            assert f"use &#39;domcapture abort {failed_record.id}&#39; to stop it" in r.text
            lease.release()
            assert store.load(failed_record.id).status == "failed"
            # submit: bad input changes nothing and says what is wrong
            before = set(store.ids())
            r = c.post("/submit", data={"csrf": token, "strategy": "snapshot-backup", "domain": "dctest-no-such-dom",
                                        "target": str(tmp_path)})
            assert r.status_code == 400 and "dctest-no-such-dom" in r.text
            assert set(store.ids()) == before
            r = c.post("/submit", data={"strategy": "snapshot-backup", "domain": "x"})
            assert r.status_code == 403  # no CSRF token
    finally:
        web.stop()


def test_metrics_open_on_loopback_only_by_default(prefix, tmp_path):
    outside = subprocess.run(["hostname", "-I"], capture_output=True, text=True).stdout.split()
    addr = next((a for a in outside if "." in a and not a.startswith("127.")), None)
    assert addr, "this test needs a non-loopback IPv4 address"
    token_file = tmp_path / "metrics-token"
    token_file.write_text("metrics-token-0123456789\n")
    web = WebServer(env_for(prefix), tmp_path / "m", "--metrics-token-file", str(token_file), host="0.0.0.0")
    try:
        assert httpx.get(f"http://127.0.0.1:{web.port}/metrics").status_code == 200
        far = f"http://{addr}:{web.port}/metrics"
        assert httpx.get(far).status_code == 403
        r = httpx.get(far, headers={"Authorization": "Bearer metrics-token-0123456789"})
        assert r.status_code == 200 and "domcapture_store_up 1.0" in r.text
        assert httpx.get(far, headers={"Authorization": "Bearer wrong"}).status_code == 403
    finally:
        web.stop()


@pytest.mark.parametrize("args, message", [
    (["web", "--bind", "nonsense"], "--bind 'nonsense': expected HOST:PORT"),
    (["web", "--bind", "127.0.0.1:18099"], "no authentication configured"),
    (["web", "--bind", "0.0.0.0:18099", "--no-auth"], "--no-auth is allowed only on a loopback address"),
    (["web", "--users", "/nonexistent/users"], "user file /nonexistent/users"),
    (["notifier"], "no notification target"),
    (["notifier", "--webhook", "ftp://x"], "not an http:// or https:// URL"),
    (["notifier", "--webhook", "http://x", "--on", "queued"], "--on: queued: choose among"),
])
def test_bad_input_one_line_exit_2(prefix, redis_client, args, message):
    env = env_for(prefix)
    env.pop("DOMCAPTURE_WEB_TOKEN", None)
    out = subprocess.run([DOMCAPTURE, *args], capture_output=True, text=True, env=env, timeout=30)
    assert out.returncode == 2, out
    assert out.stderr.count("\n") == 1 and message in out.stderr and "Traceback" not in out.stderr
    assert out.stdout == ""
    assert list(redis_client.scan_iter(f"{prefix}:*")) == []


def test_submit_verify_and_domain_page_from_the_console(cluster, disk_domain, tmp_path):
    """Through the console only: submit a backup and a checkpoint, verify the backup, read the domain page."""
    dom = disk_domain()
    target = tmp_path / "backups"
    target.mkdir()
    cluster.start_worker()
    web = WebServer(cluster.env, tmp_path / "web")
    try:
        with httpx.Client(base_url=web.url) as c:
            assert login(c, secret=web.token).status_code == 303
            form = c.get("/submit", params={"strategy": "snapshot-backup"}).text
            assert 'name="bandwidth"' in form and 'name="action"' not in form  # only this strategy's options
            token = csrf_of(c, "/submit?strategy=snapshot-backup")
            r = c.post("/submit", data={"csrf": token, "strategy": "snapshot-backup", "domain": dom.name,
                                        "target": str(target), "quiesce": "off", "bandwidth": ""})
            assert r.status_code == 303
            wf = r.headers["location"].rsplit("/", 1)[1]
            doc = cluster.wait_final(wf)
            assert doc["status"] == "succeeded" and doc["params"]["quiesce"] == "off"
            r = c.post("/submit", data={"csrf": token, "strategy": "checkpoint", "domain": dom.name,
                                        "action": "create"})
            assert r.status_code == 303
            cp_wf = r.headers["location"].rsplit("/", 1)[1]
            assert cluster.wait_final(cp_wf)["status"] == "succeeded"

            r = c.post(f"/wf/{wf}/action/verify", data={"csrf": token}, follow_redirects=True)
            assert f"{wf}: verified" in r.text
            assert cluster.show(wf)["data"]["verifications"][-1]["ok"] is True

            page = c.get("/domain", params={"host": "default", "name": dom.name}).text
            for f in doc["result"]["files"].values():
                assert f["path"] in page
            cp_name = f"domcapture-{cp_wf}"
            row = re.search(rf"<tr><td>{cp_name}</td>.*?</tr>", page, re.S)
            assert row and "committed" in row.group(0) and "<td>yes</td>" in row.group(0)
            # libvirt forgets it (metadata only): the page shows our store's entry, not in libvirt
            dom.virsh("checkpoint-delete", dom.name, cp_name, "--metadata")
            page = c.get("/domain", params={"host": "default", "name": dom.name}).text
            row = re.search(rf"<tr><td>{cp_name}</td>.*?</tr>", page, re.S)
            assert row and "committed" in row.group(0) and "<td>no</td>" in row.group(0)
            backups = re.search(r'<table id="backups">.*?</table>', page, re.S)
            assert backups and re.search(r"<td>ok \d{4}-\d\d-\d\d", backups.group(0))  # its last verify
    finally:
        web.stop()
