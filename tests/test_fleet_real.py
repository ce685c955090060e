"""Per-host queues and concurrency limits, on real Redis, two libvirt daemons and QEMU.

The two hypervisor endpoints are root's ``qemu:///system`` (the shared libvirtd)
and root's ``qemu:///session`` (a second daemon libvirt starts on demand, with
its own sockets, domains and QEMU processes).  Each gets its own worker.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from workflows.limits import Limits

from .realenv import DiskDomain, libvirt_reachable
from .test_metrics_real import scrape, value
from .webenv import WebServer

SESSION_URI = "qemu:///session"


def _policy(tmp_path, target) -> str:
    path = tmp_path / "fleet.toml"
    path.write_text(f"""\
name = "fleet"
strategy = "direct-backup"
target = "{target}"
domains = ["dctest-*"]
[hosts]
hv-sys = "qemu:///system"
hv-sess = "{SESSION_URI}"
[schedule]
cron = "0 2 * * *"
timezone = "UTC"
""")
    return str(path)


@pytest.fixture
def session_domain(tmp_path):
    if not libvirt_reachable(SESSION_URI):
        pytest.fail(f"libvirt at {SESSION_URI} is not reachable")
    made: list[DiskDomain] = []

    def make() -> DiskDomain:
        dom = DiskDomain.create(SESSION_URI, tmp_path / f"sess{len(made)}")
        made.append(dom)
        return dom
    yield make
    for dom in made:
        dom.destroy()


def _submit(cluster, dom: DiskDomain, target) -> str:
    out = cluster.cli("submit", "direct-backup", "--domain", dom.name, "--uri", dom.uri, "--target", str(target),
                      "--json")
    return json.loads(out.stdout)["id"]


def test_captures_land_on_their_host_s_worker_and_a_host_without_one_says_so(cluster, disk_domain,
                                                                              session_domain, tmp_path):
    target = tmp_path / "bk"
    target.mkdir()
    cluster.cli("policy", "apply", _policy(tmp_path, target))  # maps each host's URI to its name
    sys_worker = cluster.start_worker(host="hv-sys", uri="qemu:///system")
    on_sys, on_sess = disk_domain(), session_domain()

    waiting_id = _submit(cluster, on_sess, target)
    running_id = _submit(cluster, on_sys, target)
    done = cluster.wait_final(running_id)
    assert done["status"] == "succeeded" and done["host"] == "hv-sys"
    assert done["worker"].endswith(f":{sys_worker.pid}")

    # hv-sess has no worker: its capture waits, and list/show say why
    shown = cluster.show(waiting_id)
    assert (shown["status"], shown["host"]) == ("queued", "hv-sess")
    assert shown["waiting"].startswith("waiting for host hv-sess: no live worker")
    listed = cluster.cli("list").stdout
    line = next(x for x in listed.splitlines() if x.startswith(waiting_id))
    assert "waiting for host hv-sess" in line
    assert waiting_id not in cluster.log_of(sys_worker)
    # and /metrics shows the host's queue holding its one job, with no worker on it
    queue = cluster.env["DOMCAPTURE_QUEUE"]
    web = WebServer(cluster.env, tmp_path / "web")
    try:
        samples = scrape(web.url)[1]
    finally:
        web.stop()
    assert value(samples, "domcapture_queue_depth", queue=f"{queue}.hv-sess") == 1
    assert value(samples, "domcapture_workers", queue=f"{queue}.hv-sess") == 0
    assert value(samples, "domcapture_workers", queue=f"{queue}.hv-sys") == 1

    sess_worker = cluster.start_worker(host="hv-sess", uri=SESSION_URI)
    done = cluster.wait_final(waiting_id)
    assert done["status"] == "succeeded" and done["uri"] == SESSION_URI
    assert done["worker"].endswith(f":{sess_worker.pid}") and done["waiting"] is None
    # the backup files are there, one per disk, written by the session daemon's QEMU
    files = sorted(a["path"] for a in done["artifacts"].values() if a["kind"] == "backup-file")
    assert len(files) == 2 and all(f.startswith(str(target)) and os.path.getsize(f) > 0 for f in files)
    assert running_id in cluster.log_of(sys_worker) and waiting_id in cluster.log_of(sess_worker)
    assert running_id not in cluster.log_of(sess_worker)


def test_a_host_limit_runs_captures_one_at_a_time(cluster, disk_domain, tmp_path, redis_client, prefix):
    """Two workers on one host, a limit of one: the second capture starts after the first ended."""
    target = tmp_path / "bk"
    target.mkdir()
    doms = [disk_domain(sizes_mib={"vda": 256}, fill_mib=64, random_mib=64) for _ in range(2)]
    # limits come from policies: these two are submitted with one through the library, in a process of
    # their own (RQ's key prefix is fixed per process, and this one may serve another deployment)
    code = ("import json, sys\n"
            "from workers.runtime import Runtime\n"
            "from workers.settings import Settings\n"
            "rt = Runtime(Settings.from_env())\n"
            "rt.map_host('qemu:///system', 'hv-sys')\n"
            "print(json.dumps([rt.captures.submit('direct-backup', n, 'qemu:///system', {'target': sys.argv[1]},\n"
            "                  data={'limits': {'host': ['hv-sys', 1]}}).id for n in sys.argv[2:]]))\n")
    out = subprocess.run([sys.executable, "-c", code, str(target), *(d.name for d in doms)], env=cluster.env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    ids = json.loads(out.stdout)
    for _ in range(2):
        cluster.start_worker(host="hv-sys", uri="qemu:///system")
    ends = [cluster.wait_final(i) for i in ids]
    assert all(d["status"] == "succeeded" for d in ends)

    def span(doc: dict) -> tuple[float, float]:
        ts = [e["ts"] for e in doc["history"] if e.get("status") == "running"]
        return min(ts), max(e["ts"] for e in doc["history"])
    (a0, a1), (b0, b1) = sorted(span(d) for d in ends)
    assert a1 <= b0, f"captures overlapped: {a0}-{a1} and {b0}-{b1}"
    assert Limits(redis_client, prefix).holders("host:hv-sys") == []


def test_limits_are_all_or_nothing_and_a_dead_holder_frees_its_place(redis_client, prefix):
    limits = Limits(redis_client, prefix, ttl=0.6)
    want = {"host:hv1": 2, "target:/nas": 1}
    assert limits.try_acquire("wf-a", {"host:hv1": 2}) is None
    assert limits.try_acquire("wf-b", want) is None
    assert limits.try_acquire("wf-c", {"host:hv1": 2}) == "host:hv1"
    # the target is full: wf-d takes nothing, not even the host place it could have had
    limits.release("wf-a", ["host:hv1"])
    assert limits.try_acquire("wf-d", want) == "target:/nas"
    assert sorted(limits.holders("host:hv1")) == ["wf-b"]
    assert limits.try_acquire("wf-b", want) is None  # a holder may take again what it holds
    held = limits.held("wf-e", {"host:hv1": 2})
    time.sleep(1.0)  # longer than the TTL: renewed by its thread, still held
    assert sorted(limits.holders("host:hv1")) == ["wf-e"]  # wf-b stopped renewing: gone
    held.release()
    assert limits.holders("host:hv1") == []
