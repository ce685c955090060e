"""A locked-down Redis: a second redis-server of our own, with a password (and an ACL user).

The deployment works with the password, read from a file (never argv); every
key it writes, RQ's included, is under its prefix; without the password, or
with a wrong one, nothing runs and the error is one line.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import redis

from .realenv import DOMCAPTURE, WorkerCluster

pytestmark = pytest.mark.real

PASSWORD = f"pw-{uuid.uuid4().hex}"
APP_PASSWORD = f"app-{uuid.uuid4().hex}"
PREFIX = f"dcauth-{uuid.uuid4().hex[:6]}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def locked_redis(tmp_path_factory):
    """redis-server on a free port: requirepass for the default user, and a user limited to our keys."""
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed")
    base = tmp_path_factory.mktemp("redis-auth")
    port = _free_port()
    conf = base / "redis.conf"
    conf.write_text("\n".join([
        f"port {port}", "bind 127.0.0.1", f"dir {base}", "save \"\"", "appendonly no",
        f"requirepass {PASSWORD}",
        # the project's keys and channels only; no admin or dangerous commands
        f"user dcapp on >{APP_PASSWORD} resetkeys ~{PREFIX}:* resetchannels &{PREFIX}:* "
        "+@all -@admin -@dangerous +info",
    ]) + "\n")
    conf.chmod(0o600)
    proc = subprocess.Popen(["redis-server", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(port=port, password=PASSWORD)
    for _ in range(100):
        try:
            client.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.05)
    else:
        proc.kill()
        pytest.fail("own redis-server did not start")
    yield {"port": port, "client": client, "base": base}
    proc.terminate()
    proc.wait(timeout=10)


def _password_file(base: Path, name: str, secret: str) -> Path:
    path = base / name
    path.write_text(secret + "\n")
    path.chmod(0o600)
    return path


@pytest.mark.parametrize("user", ["default", "acl"])
def test_deployment_works_with_the_password_and_nothing_runs_without(locked_redis, libvirt_uri, disk_domain,
                                                                      tmp_path, user):
    port, admin = locked_redis["port"], locked_redis["client"]
    url = f"redis://127.0.0.1:{port}/0"
    cluster = WorkerCluster(url, libvirt_uri, PREFIX, tmp_path / "logs")
    if user == "acl":
        cluster.env["DOMCAPTURE_REDIS_USERNAME"] = "dcapp"
        cluster.env["DOMCAPTURE_REDIS_PASSWORD_FILE"] = str(_password_file(tmp_path, "pw", APP_PASSWORD))
    else:
        cluster.env["DOMCAPTURE_REDIS_PASSWORD_FILE"] = str(_password_file(tmp_path, "pw", PASSWORD))
    try:
        dom = disk_domain(sizes_mib={"vda": 16})
        target = tmp_path / "backups"
        target.mkdir()
        cluster.start_worker()
        cluster.start_recovery()
        out = cluster.cli("submit", "snapshot-backup", "--domain", dom.name, "--target", str(target), "--json")
        wf = json.loads(out.stdout)["id"]
        doc = cluster.wait_final(wf)
        assert doc["status"] == "succeeded", doc["error"]
        assert dom.on_original_disks()
        # every key of the deployment, RQ's included, is under its prefix
        keys = [k.decode() for k in admin.scan_iter("*")]
        assert any(k.startswith(f"{PREFIX}:rq:") for k in keys), keys
        assert keys and all(k.startswith(f"{PREFIX}:") for k in keys), keys
        # the password is in no process's argv
        for p in cluster.workers + [cluster.recovery]:
            argv = Path(f"/proc/{p.pid}/cmdline").read_bytes()
            assert APP_PASSWORD.encode() not in argv and PASSWORD.encode() not in argv
    finally:
        cluster.stop()

    before = {k: admin.dump(k) for k in admin.scan_iter("*")}
    no_pw = {k: v for k, v in cluster.env.items() if not k.startswith("DOMCAPTURE_REDIS_PASSWORD")}
    wrong = {**cluster.env, "DOMCAPTURE_REDIS_PASSWORD_FILE": str(_password_file(tmp_path, "bad", "wrong"))}
    for env, fragment in ((no_pw, "redis refused"), (wrong, "redis refused")):
        for argv in (["list"], ["show", wf], ["worker", "--burst"], ["recovery", "--once"],
                     ["submit", "snapshot-backup", "--domain", dom.name, "--target", str(target)]):
            res = subprocess.run([DOMCAPTURE, *argv], env=env, capture_output=True, text=True, timeout=60)
            assert res.returncode == 4, (argv, res.stderr)
            assert res.stderr.count("\n") == 1 and fragment in res.stderr, (argv, res.stderr)
            assert "Traceback" not in res.stderr and res.stdout == ""
    assert {k: admin.dump(k) for k in admin.scan_iter("*")} == before  # nothing ran
    for key in admin.scan_iter(f"{PREFIX}:*"):
        admin.delete(key)


def test_the_acl_user_cannot_reach_keys_outside_the_prefix(locked_redis):
    app = redis.Redis(port=locked_redis["port"], username="dcapp", password=APP_PASSWORD)
    app.set(f"{PREFIX}:probe", "1")
    with pytest.raises(redis.exceptions.NoPermissionError):
        app.set("rq:queue:someone-else", "1")
    with pytest.raises(redis.exceptions.NoPermissionError):
        app.flushall()
    app.delete(f"{PREFIX}:probe")


def test_tls_with_a_password(tmp_path):
    """Debian's redis-server is built with TLS: rediss:// with the CA from the URL, the password from a file."""
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(tmp_path / "key.pem"),
                    "-out", str(tmp_path / "cert.pem"), "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    port = _free_port()
    proc = subprocess.Popen(["redis-server", "--port", "0", "--tls-port", str(port), "--tls-cert-file",
                             str(tmp_path / "cert.pem"), "--tls-key-file", str(tmp_path / "key.pem"),
                             "--tls-ca-cert-file", str(tmp_path / "cert.pem"), "--tls-auth-clients", "no",
                             "--requirepass", PASSWORD, "--save", "", "--appendonly", "no", "--dir", str(tmp_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        env = {**WorkerCluster("redis://unused", "qemu:///system", PREFIX, tmp_path / "logs").env,
               "DOMCAPTURE_REDIS_URL": f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={tmp_path / 'cert.pem'}",
               "DOMCAPTURE_REDIS_PASSWORD_FILE": str(_password_file(tmp_path, "pw", PASSWORD))}
        for _ in range(100):
            res = subprocess.run([DOMCAPTURE, "list", "--json"], env=env, capture_output=True, text=True)
            if res.returncode == 0 or "Connection refused" not in res.stderr:
                break
            time.sleep(0.1)
        assert res.returncode == 0 and json.loads(res.stdout) == [], res.stderr
        res = subprocess.run([DOMCAPTURE, "worker", "--burst"], env=env, capture_output=True, text=True)
        assert res.returncode == 0, res.stderr
        # a server certificate the client cannot verify: refused, one line
        env["DOMCAPTURE_REDIS_URL"] = f"rediss://127.0.0.1:{port}/0"
        res = subprocess.run([DOMCAPTURE, "list"], env=env, capture_output=True, text=True)
        assert res.returncode == 4 and res.stderr.count("\n") == 1 and "CERTIFICATE_VERIFY_FAILED" in res.stderr
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_compose_redis_command_requires_the_password(tmp_path):
    """docker-compose.yml's Redis service command, run outside Docker the same way: it requires the secret."""
    import yaml
    doc = yaml.safe_load((Path(__file__).resolve().parent.parent / "docker-compose.yml").read_text())
    secret = _password_file(tmp_path, "redis-password", PASSWORD)
    assert "redis_password" in doc["services"]["redis"]["secrets"]
    for name in ("worker", "recovery"):
        svc = doc["services"][name]
        assert svc["environment"]["DOMCAPTURE_REDIS_PASSWORD_FILE"] == "/run/secrets/redis_password"
        assert "redis_password" in svc["secrets"]
        assert PASSWORD not in json.dumps(svc)
    cmd = [part.replace("$$", "$").replace("/run/secrets/redis_password", str(secret))
           .replace("/tmp/auth.conf", str(tmp_path / "auth.conf")) for part in doc["services"]["redis"]["command"]]
    port = _free_port()
    proc = subprocess.Popen([*cmd, "--port", str(port), "--dir", str(tmp_path)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        env = {**WorkerCluster(f"redis://127.0.0.1:{port}/0", "qemu:///system", PREFIX, tmp_path / "logs").env,
               "DOMCAPTURE_REDIS_PASSWORD_FILE": str(secret)}
        for _ in range(100):
            res = subprocess.run([DOMCAPTURE, "list", "--json"], env=env, capture_output=True, text=True)
            if "Connection refused" not in res.stderr:
                break
            time.sleep(0.1)
        assert res.returncode == 0 and json.loads(res.stdout) == [], res.stderr
        assert PASSWORD.encode() not in Path(f"/proc/{proc.pid}/cmdline").read_bytes()
        env.pop("DOMCAPTURE_REDIS_PASSWORD_FILE")
        res = subprocess.run([DOMCAPTURE, "list"], env=env, capture_output=True, text=True)
        assert res.returncode == 4 and res.stderr.count("\n") == 1 and "Authentication required" in res.stderr
    finally:
        proc.terminate()
        proc.wait(timeout=10)
