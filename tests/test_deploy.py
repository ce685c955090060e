"""The deployment files work: systemd units pass ``systemd-analyze verify``, and every
docker-compose service's command starts outside Docker, with the same argv and
environment, against the local redis-server and libvirtd, and comes up.

What differs from a container, and only that: the compose file's variables are
given test values (as an ``.env`` would), ``redis://redis:6379`` is the local
Redis (compose's service name), the published port of ``web`` is a free local
port (Docker's port mapping), and a private prefix and queue keep the test's
keys apart.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any, cast

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from workers.cli import build_parser

from .conftest import REDIS_URL
from .realenv import DOMCAPTURE
from .webenv import free_port, wait_http

REPO = Path(__file__).resolve().parent.parent
UNITS = REPO / "deploy" / "systemd"
INSTALLED = "/usr/local/bin/domcapture"


def subcommands() -> set[str]:
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return set(cast(dict[str, Any], sub.choices))  # a subparsers action: name -> its parser


def test_systemd_units_verify(tmp_path):
    assert shutil.which("systemd-analyze"), "systemd-analyze is missing (Debian package systemd)"
    names = sorted(p.name for p in UNITS.glob("*.service"))
    assert names == ["domcapture-notifier.service", "domcapture-recovery.service", "domcapture-scheduler.service",
                     "domcapture-web.service", "domcapture-worker@.service"]
    for name in names:
        text = (UNITS / name).read_text()
        execs = re.findall(r"^ExecStart=(\S+) (\S+)", text, re.M)
        assert len(execs) == 1 and execs[0][0] == INSTALLED, execs
        assert execs[0][1] in subcommands()
        # verify checks that the executable exists: point it at the one this test runs
        (tmp_path / name).write_text(text.replace(INSTALLED, DOMCAPTURE))
    for unit in ["domcapture-worker@1.service"] + [n for n in names if "@" not in n]:
        out = subprocess.run(["systemd-analyze", "verify", str(tmp_path / unit)], capture_output=True, text=True,
                             timeout=60)
        assert out.returncode == 0 and out.stdout + out.stderr == "", f"{unit}: {out.stdout}{out.stderr}"
    worker = (UNITS / "domcapture-worker@.service").read_text()
    assert "RuntimeDirectory=domcapture" in worker  # /run/domcapture, for pull-mode sockets


def interpolate(value: str, variables: dict[str, str]) -> str:
    """Compose's ``${NAME}``, ``${NAME:-default}`` and ``${NAME:?error}``."""
    def one(m: re.Match[str]) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3)
        if variables.get(name):
            return variables[name]
        if op == ":?":
            raise AssertionError(f"compose needs {name}: {arg}")
        return arg or ""
    return re.sub(r"\$\{(\w+)(?:(:[-?])([^}]*))?\}", one, value)


def compose_services() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]


def test_compose_mounts_what_pull_mode_needs():
    services = compose_services()
    for name in ("worker", "recovery", "web"):
        vols = services[name]["volumes"]
        assert "/run/domcapture:/run/domcapture" in vols
        assert "/run/libvirt/libvirt-sock:/run/libvirt/libvirt-sock" in vols
    assert {"web", "notifier"} <= set(services)


@pytest.mark.real
def test_compose_services_start_outside_docker(redis_client, prefix, libvirt_uri, tmp_path):
    services = compose_services()
    assert 'ENTRYPOINT ["domcapture"]' in (REPO / "Dockerfile").read_text()
    variables = {"DOMCAPTURE_WEB_TOKEN": "compose-test-token-0123456789",
                 "DOMCAPTURE_NOTIFY_WEBHOOKS": "http://127.0.0.1:9/unused"}
    queue = f"{prefix}-q"
    procs: dict[str, subprocess.Popen] = {}
    web_port = free_port()
    # a stored policy, so the scheduler has something to look at (its domains match none: nothing is submitted)
    policy = "compose"
    (tmp_path / "bk").mkdir()
    (tmp_path / "p.toml").write_text(f'name = "{policy}"\nstrategy = "direct-backup"\n'
                                     f'target = "{tmp_path / "bk"}"\ndomains = ["dc-none-*"]\n'
                                     f'[hosts]\nhere = "{libvirt_uri}"\n'
                                     '[schedule]\ncron = "0 2 * * *"\ntimezone = "UTC"\n')
    subprocess.run([DOMCAPTURE, "policy", "apply", str(tmp_path / "p.toml")], check=True, capture_output=True,
                   text=True, env={**os.environ, "DOMCAPTURE_REDIS_URL": REDIS_URL, "DOMCAPTURE_PREFIX": prefix},
                   timeout=60)
    try:
        for name, svc in services.items():
            if "build" not in svc:
                continue  # redis: the local redis-server stands in for it
            argv = [DOMCAPTURE, *svc["command"]]
            argv = [a.replace("0.0.0.0:8080", f"0.0.0.0:{web_port}") for a in argv]
            env = {k: interpolate(str(v), variables) for k, v in svc["environment"].items()}
            env["DOMCAPTURE_REDIS_URL"] = env["DOMCAPTURE_REDIS_URL"].replace("redis://redis:6379/0", REDIS_URL)
            assert env["LIBVIRT_DEFAULT_URI"] == libvirt_uri
            env.update(DOMCAPTURE_PREFIX=prefix, DOMCAPTURE_QUEUE=queue, PATH=os.environ["PATH"])
            # the compose Redis asks for a password (tested with its own command in test_redis_auth_real);
            # the local redis-server standing in for it asks for none, and a password for it is refused
            assert env.pop("DOMCAPTURE_REDIS_PASSWORD_FILE") == "/run/secrets/redis_password"
            if "PYTHONPATH" in os.environ:  # the code under test, as the image's install would be
                env["PYTHONPATH"] = os.environ["PYTHONPATH"]
            log = open(tmp_path / f"{name}.log", "w")
            procs[name] = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT,
                                           start_new_session=True)
        assert set(procs) == {"worker", "recovery", "scheduler", "web", "notifier"}

        r = wait_http(f"http://127.0.0.1:{web_port}/metrics", proc=procs["web"])
        assert r.status_code == 200
        samples = {s.name: s.value for f in text_string_to_metric_families(r.text) for s in f.samples}
        assert samples["domcapture_store_up"] == 1
        deadline = time.time() + 30
        while True:
            workers = list(redis_client.scan_iter(f"{prefix}:rq:worker:*"))  # RQ's keys, under the prefix
            notified = redis_client.exists(f"{prefix}:notify:since")
            swept = "recovery: sweeping every" in (tmp_path / "recovery.log").read_text()
            scheduled = redis_client.hexists(f"{prefix}:sched:{policy}", "cursor")  # its first sight of the policy
            if workers and notified and swept and scheduled:
                break
            for name, p in procs.items():
                assert p.poll() is None, f"{name} exited: {(tmp_path / f'{name}.log').read_text()}"
            assert time.time() < deadline, (f"workers={workers} notifier={notified} recovery={swept} "
                                            f"scheduler={scheduled}")
            time.sleep(0.2)
        assert len(workers) == 1
        assert all(p.poll() is None for p in procs.values())
    finally:
        for p in procs.values():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs.values():
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=5)


def test_wheel_ships_the_console_templates_and_htmx(tmp_path):
    """An installed package (not a checkout) must find its templates and static files."""
    import sys
    import zipfile
    src = tmp_path / "src"  # a copy: the build leaves build/ and *.egg-info behind
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    for pkg in ("workflows", "workers"):
        shutil.copytree(REPO / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                          "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    wheel = next((tmp_path / "dist").glob("domcapture-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    templates = {f"workers/templates/{p.name}" for p in (REPO / "workers" / "templates").glob("*.html")}
    assert templates and templates <= names
    assert "workers/static/htmx.min.js" in names
